// Fused CPU matmul over nibble's packed weight formats (decode GEMV and
// prefill GEMM), AMX-INT8 (prefill) / AVX-512 VNNI / AVX2 / scalar with
// run-time dispatch.
//
// Goals: y = x W^T straight from the packed rows of every format in
// fmt::AllFormats() without materialising fp32 weights; mixed-format row
// segments; the fp16/int8 side-car of kept weights fused per row; no
// allocation on the hot path (buffers live in a reusable QMatMulScratch).
// Non-goals: AMX for decode (a GEMV cannot feed the tile unit: < 8 tokens per
// call stay on VNNI),
// bit-identical results between the AMX path and the per-ISA kernels (see
// Numerics), load-time repacking (the file layout is used as is; the AMX
// path unpacks each 16-row strip per call), CUDA, validation per call
// (ValidateQMatrix checks a view once).
//
// Algorithm (all ISAs):
//  1. Activations are quantized once per call, per token and per block of 32
//     columns, to int8: dx_b = max|x| / 127, xq = rint(x * (127 / max|x|))
//     in [-127, 127] (dx_b = 0 for an all-zero or non-finite block). Columns
//     past `cols` are zero up to the next multiple of 64. Also kept per block:
//     the 8 lane sums X_b[l] = sum of xq over columns 4l .. 4l+3 and the block
//     sum S_b = sum of xq over the block.
//  2. Every format's value is written as w = d * q + m with an unsigned code
//     q and per-group d, m: int asym (d, m as stored), int sym (m = -2^(B-1) d),
//     ternary (d = a, m = -a), binary (q = sign bit, d = 2a, m = -a), bintern
//     per group as ternary or binary.
//  3. row . x = sum_b [ sum_{l<8} d_g dx_b L_b[l] + m_g dx_b S_b ]
//     where L_b[l] = sum of q * xq over columns 4l .. 4l+3 of block b is an
//     exact int32 (u8 x s8: _mm512_dpbusd_epi32 on AVX-512 VNNI; on AVX2
//     _mm256_maddubs_epi16 + madd, int8 codes as q - 128 with the sign trick
//     and 128 X_b[l] added back in int32, so nothing saturates; plain ints
//     in scalar). The fp32 sums follow one canonical order in every ISA
//     (kernels/cpu/qmatmul_internal.h: 32 D lanes + 4 M chains, 4 block slots, fixed
//     reduction tree), so scalar, AVX2 and AVX-512 give bit-identical y.
//  4. Side-car: y[r] += sum over kept (c, v) of (v - packed(r, c)) * x[c] in
//     fp32 with the exact x (kept values REPLACE the packed value), fused per
//     row after its packed dot.
//  AMX (kernels/cpu/qmatmul_amx.cc, QIsa::kAmx): QuantMatMul takes it when
//  ActiveQIsa() is kAvx512, the call has n_tokens >= 8 (qmm::kAmxMinTokens,
//  measured; NIBBLE_QMATMUL_AMX_MIN_TOKENS=N overrides), the CPU reports
//  amx_tile + amx_int8 and the kernel grants XTILEDATA (arch_prctl, requested
//  once per process), unless NIBBLE_QMATMUL_AMX=0. Otherwise (or for formats
//  qmm::AmxCovers rejects) the AVX-512 VNNI kernel runs. Per 16-row strip
//  the u8 codes are unpacked once into TDPBSUD's B layout and reused by
//  every 16-token tile; each 32-column block b gives the exact int32
//  L_b[t][r] = sum_c q xq (the sum of the 8 lane sums of step 3), and the
//  fp32 epilogue adds fl(d_g dx_b) L_b per block and m_g * sum_{b in g} dxs_b
//  per group ("AMX order", qmatmul_internal.h). Each thread that runs tiles
//  loads the tile configuration itself (per call) and releases it after.
//  Tiling (AVX-512): decode (1 token) runs 4-row micro-tiles that share the
//  activation loads and finish with one joint 4-row reduction (same adds as
//  the canonical tree), with software prefetch of the weight rows 2 tiles
//  ahead; prefill runs tiles of up to 6 tokens, so each packed step is
//  unpacked once per tile. Kernels are specialised per (code layout, header
//  kind, group size) at compile time. Rows go in chunks of 32 (hot in cache
//  across tiles) and are split over the ThreadPool in grains of 16 rows
//  (each thread writes disjoint output rows / cache lines).
//
// Numerics: the fast path quantizes activations, so it is NOT the fp32
// reference (QuantMatMulF32Ref). Rounding x to xq * dx_b moves each x_c by at
// most dx_b / 2 (plus a few ulps), hence per output
//     |fast - exact| <= sum_c |w_c| * dx_{b(c)} / 2  + fp32 accumulation error
// (w_c the packed value, i.e. before the side-car replaces it; the side-car
// term itself uses the exact x). qmatmul_test.cc asserts this bound (with a
// 1e-3 slack on the rounding and 1e-5 of the sum of |terms| for fp32) for
// every format, and asserts that every ISA equals the scalar version of the
// same int8 algorithm bit for bit.
// The AMX path uses the same xq, dx and exact integer block sums, so it
// obeys the same bound, but it is NOT bit-identical to the canonical order,
// and cannot be at a profit: the canonical order scales each 4-column lane
// sum L_b[l] into its own fp32 lane, and a tile dot product only yields the
// 32-column sum (getting lane sums from TDPBSUD means K = 4, 1/16 of its
// work). So the AMX path has its own fixed order (per output, independent of
// tiling, threads and token position: results depend only on the token's own
// activations and on whether the call took the AMX path). qmatmul_test
// asserts it equals QuantMatMulAmxOrderRef (the same order in scalar code) bit
// for bit, stays within the bound above, and within 2e-6 * sum of |terms| of
// the canonical kernels; quantizers/qmatmul_model_test (run with
// NIBBLE_QMATMUL_AMX_MIN_TOKENS=1) checks greedy text against the other ISAs.
//
// Thread safety: QuantMatMul may run concurrently only with distinct scratch
// objects; the pool's rules apply (one ParallelFor at a time). The AMX path
// adds thread-local unpack buffers and per-thread tile configuration (loaded
// and released inside each call), so it needs nothing more.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "kernels/formats/format.h"

namespace nibble {

class ThreadPool;

namespace cpu {

// One run of rows [row_begin, row_end) in one format; data holds
// (row_end - row_begin) * format.RowBytes(cols) bytes, row after row.
struct QSegmentView {
  int64_t row_begin = 0, row_end = 0;
  fmt::Format format;
  const uint8_t* data = nullptr;
};

// CSR side-car (engine/core/quant_tensor.h Sidecar, as raw pointers).
struct QSidecarView {
  enum class Type : uint8_t { kNone = 0, kF16 = 1, kI8 = 2 };
  Type type = Type::kNone;
  const uint32_t* row_ptr = nullptr;    // rows + 1
  const uint16_t* col = nullptr;        // nnz
  const uint16_t* f16 = nullptr;        // kF16: nnz values
  const int8_t* i8 = nullptr;           // kI8: nnz values, value = row_scale[r] * i8
  const uint16_t* row_scale = nullptr;  // kI8: rows fp16 scales
};

struct QMatrixView {
  int64_t rows = 0, cols = 0;
  std::span<const QSegmentView> segments;  // contiguous, covering [0, rows) in order
  QSidecarView sidecar;
};

// Checks a view's shape: rows, cols >= 1 (cols <= 65536), segments in
// AllFormats() that tile [0, rows) in order with non-null data, side-car
// pointers present for its type, row_ptr non-decreasing with columns < cols.
// (Byte counts behind the pointers cannot be checked here.) Returns false
// and an error message naming the field on failure.
bool ValidateQMatrix(const QMatrixView& w, std::string* error);

// Reusable buffers of QuantMatMul (quantized activations). Grows to the
// largest call seen, then never allocates again.
class QMatMulScratch {
 public:
  QMatMulScratch();
  ~QMatMulScratch();
  QMatMulScratch(const QMatMulScratch&) = delete;
  QMatMulScratch& operator=(const QMatMulScratch&) = delete;
  struct Impl;
  Impl* impl() { return impl_.get(); }

 private:
  std::unique_ptr<Impl> impl_;
};

// kAmx: the AVX-512 VNNI kernels plus the AMX-INT8 tile kernel for the
// segments qmm::AmxCovers, at any token count (explicit use: tests,
// benchmarks; QuantMatMul picks it per call, see AMX above). Not
// bit-identical to the others (see Numerics).
enum class QIsa : uint8_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// The ISA QuantMatMul uses now: cpu::ActiveIsa() (NIBBLE_FORCE_ISA /
// ForceIsaForTesting), where "avx512" also needs AVX-512 VNNI (else AVX2).
// NIBBLE_QMATMUL_ISA=scalar|avx2|avx512 (read once) overrides it for these
// kernels alone, leaving the fp32 ops on ActiveIsa().
QIsa ActiveQIsa();
// Whether this CPU can run `isa`'s kernels (kAmx: AVX-512 VNNI, amx_tile,
// amx_int8 and the OS grant of the tile state; NIBBLE_QMATMUL_AMX does not
// matter here).
bool QIsaSupported(QIsa isa);
const char* QIsaName(QIsa isa);

// y[t, r] = sum_c W[r, c] x[t, c], t < n_tokens, r < rows (x [n_tokens, cols],
// y [n_tokens, rows], row-major), by the int8-activation algorithm above on
// ActiveQIsa(), through the AMX path when it applies (see AMX above).
// pool may be null (single thread).
// REQUIRES: ValidateQMatrix(w) holds; x, y do not overlap; n_tokens >= 1.
void QuantMatMul(const QMatrixView& w, const float* x, int64_t n_tokens, float* y, ThreadPool* pool,
                 QMatMulScratch* scratch);
// QuantMatMul of several matrices on the same x (ys[i] = ws[i] x, [n_tokens,
// ws[i].rows]): one activation quantization and one parallel region over all
// their rows (e.g. a layer's wq/wk/wv, or w_gate/w_up, in one decode fork/join).
// Each ys[i] is bit for bit what QuantMatMul(ws[i], ...) writes.
// REQUIRES: ws.size() == ys.size() >= 1, every ws[i] valid with the same cols,
// no y overlapping x or another y.
void QuantMatMulMany(std::span<const QMatrixView> ws, const float* x, int64_t n_tokens, std::span<float* const> ys,
                     ThreadPool* pool, QMatMulScratch* scratch);
// Same on an explicit ISA's kernels (tests, benchmarks); the AMX tiles only
// for isa == kAmx (whatever n_tokens and the environment say).
// REQUIRES: QIsaSupported(isa).
void QuantMatMulIsa(QIsa isa, const QMatrixView& w, const float* x, int64_t n_tokens, float* y,
                    ThreadPool* pool, QMatMulScratch* scratch);

// Whether QuantMatMul takes the AMX tiles for a call of n_tokens (ActiveQIsa,
// CPU support, NIBBLE_QMATMUL_AMX, the token threshold).
bool QuantMatMulTakesAmx(int64_t n_tokens);

// Prefill on CPUs without AMX: y = x W^T in fp32 from W dequantized 32 rows
// at a time (fmt::DequantizeRowRef, or its bit-identical AVX-512 / AVX2 twin
// on ActiveQIsa(); side-car applied) into the packed-panel
// fp32 GEMM of cpu::MatMulF32Filled. No activation rounding: for n_tokens >=
// kMatMulF32PackedMinTokens on AVX2/AVX-512 every output is exactly
// MatMulF32PackedOrderRef of the dequantized matrix (within fp32 rounding of
// QuantMatMulF32Ref, closer to it than the int8 path). Dequantization costs
// O(rows * cols) per call, repaid over many tokens; the int8 VNNI kernels
// spend ~6 instructions per 64 multiply-adds on block scales, so from a few
// dozen tokens on the fp32 FMA GEMM is faster where no AMX unit takes them.
// pool may be null.
void QuantMatMulDequantF32(const QMatrixView& w, const float* x, int64_t n_tokens, float* y, ThreadPool* pool);

// The AMX path's result computed in scalar code on any CPU: bit-identical to
// QuantMatMulIsa(QIsa::kAmx, ...) (the AMX fp32 order for segments the AMX
// kernel covers, the canonical order for the others). Single-threaded, slow.
void QuantMatMulAmxOrderRef(const QMatrixView& w, const float* x, int64_t n_tokens, float* y);

// Exact fp32 reference: each row dequantized by fmt::DequantizeRowRef, the
// side-car applied, then an fp32 dot in column order. Single-threaded, slow.
void QuantMatMulF32Ref(const QMatrixView& w, const float* x, int64_t n_tokens, float* y);

// The packed value of weight (r, c) before the side-car (for tolerances, the
// side-car term). REQUIRES: r < rows, c < cols.
float PackedWeightAt(const QMatrixView& w, int64_t r, int64_t c);

}  // namespace cpu
}  // namespace nibble
