// Measured read bandwidth: the bound that nibble-bench and qmatmul_bench
// report their weight streams against.
#pragma once

#include <cstddef>

namespace nibble::bench {

// Read bandwidth (GB/s) over a buffer of `bytes` (at least 64 KiB) with
// `threads` threads: the best of 5 timed passes (after one warm-up) of a sum
// over disjoint slices (64-byte loads on AVX-512 CPUs; each pass reads at
// least 16 MiB, repeating a small buffer). Where the buffer fits a cache
// level this is that level's bandwidth, which is then the bound for a kernel
// streaming the same bytes.
double MeasureReadBandwidth(size_t bytes, int threads);

}  // namespace nibble::bench
