// nibble's own model file (".nbl"): one self-describing, versioned,
// checksummed, mmap-able file carrying everything needed to serve a model.
//
// Goals: hyper-parameters (every ModelConfig field), the tokenizer (every
// VocabSpec field; a SentencePiece .model is embedded byte for byte), the chat
// template, provenance key/values (LoadedModel::metadata) and every tensor:
// fp32, fp16, or quantized (row segments in fmt::Format's stored by their
// stable Name(), plus the CSR side-car). Every array starts at a 64-byte
// aligned offset so quantized tensors are zero-copy views of the mapping.
// A CRC32C guards the header, the JSON directory and every array. Loading
// validates every offset, length, alignment, shape, format name and side-car
// invariant before anything is used: corrupt input gives an error naming the
// file and the field/tensor, never a crash or an out-of-bounds read.
// Non-goals: interpreting packed codes (fmt::Format's job), streaming/partial
// loads, in-place editing. The byte layout is specified in docs/FORMAT.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/core/loaded_model.h"

namespace nibble::io {

// "NIBL": the first four bytes of every nibble model file.
inline constexpr char kNibbleMagic[4] = {'N', 'I', 'B', 'L'};
// The newest version this build reads and writes (docs/FORMAT.md,
// "Versioning"): version 2 adds config.residual_rotation. The writer writes
// version 1 unless the model needs 2, so such files stay readable by older builds.
inline constexpr uint32_t kNibbleVersion = 2;
inline constexpr uint32_t kNibbleMinVersion = 1;
// Alignment of the data section and of every array in it, in bytes.
inline constexpr uint64_t kNibbleAlign = 64;
// Size of the fixed binary header in bytes.
inline constexpr uint64_t kNibbleHeaderSize = 64;

// True if `head` (the first `n` bytes of a file) starts with kNibbleMagic.
bool LooksLikeNibbleFile(const uint8_t* head, size_t n);

struct NibbleWriteOptions {
  // Store unquantized 2-D matrices as IEEE fp16 (round-to-nearest-even);
  // 1-D tensors (norms) stay fp32 unless fp16_vectors.
  bool fp16_matrices = false;
  // Store 1-D tensors (norm weights) as IEEE fp16 too (nibble-quantize
  // --norm-format f16 rounds them first, so nothing is lost).
  bool fp16_vectors = false;
  // fsync the temporary file before renaming it over `path`. Turning it off
  // only weakens durability against power loss (tests, scratch files).
  bool fsync = true;
};

// Writes `m` to `path` (via path + ".tmp" and an atomic rename, so a crash
// never leaves a partial file at `path`). Tensors with `quant` set are stored
// with their segments and side-car; others as fp32 (or fp16, see options).
// The tokenizer of kind kSentencePieceModel is embedded: its bytes are read
// from vocab.sp_model_path (or taken from VocabSpec::sp_model_bytes once that
// field exists). m.source_path/source_format are recorded as provenance only.
// Errors (naming `path` and the tensor/field): invalid config or weight
// shapes, inconsistent quantized tensors, strings that are not UTF-8 in
// JSON-carried fields (names, chat template, metadata), I/O failures.
// Thread safety: reentrant; `m` is only read.
absl::Status WriteNibbleFile(const LoadedModel& m, const std::string& path, const NibbleWriteOptions& opts = {});

struct NibbleLoadOptions {
  // Verify the CRC32C of every array (reads the whole file once). The header
  // and JSON checksums are always verified. Structural checks (offsets,
  // lengths, alignment, shapes, format names, side-car invariants) always run.
  bool verify_tensor_checksums = true;
  // Keep matrices stored as fp16 at 16 bits (HostTensor::f16, a view of the
  // mapping) instead of widening them into HostTensor::data.
  bool keep_f16 = false;
};

// Maps `path` and returns the model it describes: fp32/fp16 tensors are
// copied into HostTensor::data as fp32 (fp16 matrices stay fp16 views of the
// mapping with opts.keep_f16), quantized tensors are views into the
// mapping (kept alive through QuantTensor::owners). Fills config, weights,
// vocab, chat_template, metadata; source_path = path, source_format = "nibble".
// A kSentencePieceModel tokenizer comes back with its recorded sp_model_path
// (and its embedded bytes in VocabSpec::sp_model_bytes once that field
// exists); nothing is written to disk.
// Errors: NOT_FOUND for a missing file; DATA_LOSS for truncation or checksum
// mismatches; INVALID_ARGUMENT for bad magic, malformed JSON or inconsistent
// fields; UNIMPLEMENTED for an unknown version. Each names `path` and the
// offending field or tensor.
// Thread safety: reentrant; uses a few worker threads for checksums.
absl::StatusOr<LoadedModel> LoadNibbleFile(const std::string& path, const NibbleLoadOptions& opts = {});

// CRC32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and
// final xor 0xFFFFFFFF; the iSCSI/ext4 checksum). Extends a previous result:
// Crc32c(b, Crc32c(a)) == Crc32c(a ++ b); Crc32c("123456789") == 0xE3069283.
// Uses SSE4.2 when the CPU has it.
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);
// The portable table-driven implementation (exposed for tests).
uint32_t Crc32cPortable(const void* data, size_t n, uint32_t crc = 0);

}  // namespace nibble::io
