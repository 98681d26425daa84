// Weights and caches in transparent-huge-page memory.
//
// Goals: the decode GEMV and attention stream weights and K/V rows far
// faster than 4 KiB pages allow on machines that run THP in "madvise" mode
// (the common default): the hardware prefetchers stop at every 4 KiB page
// boundary and each page costs a TLB entry. Memory from HugePageAlloc is
// 2 MiB aligned and advised MADV_HUGEPAGE before its first touch.
// Non-goals: explicit hugetlbfs pools; guarantees (the kernel may still back
// the memory with small pages: everything works the same, only slower).
#pragma once

#include <cstddef>
#include <memory>

#include "engine/core/weights.h"

namespace nibble {

// Memory of at least `bytes` bytes (2 MiB aligned, advised for huge pages on
// Linux), zeroed unless `zero` is false (then its pages stay uncommitted
// until first written, as with operator new); nullptr when the allocation
// fails.
std::shared_ptr<void> HugePageAlloc(size_t bytes, bool zero = true);

// Copies the packed bytes of every quantized matrix of `w` (segments and
// side-car arrays) and the values of every fp16 matrix into one huge-page
// arena and points the tensors at it (the values are unchanged; 64-byte
// aligned like the file's). Memory-mapped model
// files stay mapped but their pages are no longer touched. Returns the bytes
// copied (0 when nothing is quantized or fp16 or the arena cannot be allocated, in
// which case `w` is left as it was).
size_t MoveQuantizedToHugePages(ModelWeights* w);

// The same for the fp32 matrices of `w`: their values move from
// HostTensor::data into one huge-page arena (HostTensor::f32; `data` is
// emptied). For serving: code that edits weights (the quantizer) works on
// `data` and must not be given such a model. Returns the bytes moved (0 when
// there are none or the arena cannot be allocated; `w` is then unchanged).
size_t MoveF32ToHugePages(ModelWeights* w);

// False when NIBBLE_HUGE_PAGES=0 is set in the environment.
bool HugePagesAllowedByEnv();

}  // namespace nibble
