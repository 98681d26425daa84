// Dispatch, activation quantization, side-car, references and the scalar
// kernel of the packed-weight matmul (kernels/cpu/qmatmul.h).
#include "kernels/cpu/qmatmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "kernels/common/fp16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qmatmul_internal.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/formats/blocks.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace nibble::cpu {

// ------------------------------------------------------------- scratch ---

struct QMatMulScratch::Impl {
  // 64-byte aligned views into owned vectors; grow only.
  std::vector<uint8_t> bytes;
  int8_t* xq = nullptr;
  float *dx = nullptr, *dxs = nullptr, *dx16 = nullptr;
  int32_t* xs4 = nullptr;
  float* xsum = nullptr;
  int64_t cap_blocks = 0;  // n_tokens * nb the buffers hold
  std::vector<float> amx_gdxs;  // AMX path: dxt + dxs group sums (qmm::AmxActs), grow only
  std::vector<int8_t> amx_xq;   // AMX path: tile-major xq (+ 64 bytes for alignment), grow only

  void Reserve(int64_t total_blocks) {
    if (total_blocks <= cap_blocks) return;
    // Per block: 32 B codes + 32 B dx16 (16 floats per pair) + 4 B dx + 4 B dxs + 32 B xs4 + 4 B xsum.
    const size_t need = static_cast<size_t>(total_blocks) * (32 + 32 + 4 + 4 + 32 + 4) + 6 * 64;
    bytes.assign(need, 0);
    uintptr_t p = (reinterpret_cast<uintptr_t>(bytes.data()) + 63) & ~uintptr_t{63};
    xq = reinterpret_cast<int8_t*>(p);
    p += static_cast<size_t>(total_blocks) * 32;
    dx16 = reinterpret_cast<float*>(p);
    p += static_cast<size_t>(total_blocks) * 32;
    p = (p + 63) & ~uintptr_t{63};
    dx = reinterpret_cast<float*>(p);
    p += static_cast<size_t>(total_blocks) * 4;
    dxs = reinterpret_cast<float*>(p);
    p += static_cast<size_t>(total_blocks) * 4;
    p = (p + 63) & ~uintptr_t{63};
    xs4 = reinterpret_cast<int32_t*>(p);
    p += static_cast<size_t>(total_blocks) * 32;
    xsum = reinterpret_cast<float*>(p);
    cap_blocks = total_blocks;
  }
};

QMatMulScratch::QMatMulScratch() : impl_(std::make_unique<Impl>()) {}
QMatMulScratch::~QMatMulScratch() = default;

namespace qmm {

// ------------------------------------------------- activation quantization ---

// QuantizeActs / QuantizeActsScalar: kernels/cpu/qmatmul_acts.cc.


// --------------------------------------------------------- scalar kernel ---

namespace {

inline int CodeAt(const FormatInfo& fi, const GroupAffine& ga, int i) {
  switch (fi.code) {
    case CodeKind::kU8: return ga.codes[i];
    case CodeKind::kU4: return fmt::GetCode(ga.codes, 4, i);
    case CodeKind::kU3: return fmt::GetCode3(ga.codes, fi.group, i);
    case CodeKind::kU2: return fmt::GetCode(ga.codes, 2, i);
    case CodeKind::kU1: return fmt::GetCode(ga.codes, 1, i);
    case CodeKind::kBinTern: return fmt::GetCode(ga.codes, ga.ternary ? 2 : 1, i);
    case CodeKind::kNl4: return NlBiased(4, fmt::GetCode(ga.codes, 4, i));
    case CodeKind::kNl3: return NlBiased(3, fmt::GetCode3(ga.codes, fi.group, i));
    case CodeKind::kNl2: return NlBiased(2, fmt::GetCode(ga.codes, 2, i));
  }
  return 0;
}

}  // namespace

void RowsScalar(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  const FormatInfo fi = Describe(f);
  const int64_t row_bytes = f.RowBytes(a.cols);
  const int spg = fi.group / kBlock;
  const int64_t nb_used = (a.cols + kBlock - 1) / kBlock;
  const bool sym = fi.header == HeaderKind::kIntSym;
  const float sym_c = SymMul(fi.bits);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int8_t* xq = a.xq + t * a.nb * kBlock;
    const float* dx = a.dx + t * a.nb;
    const float* xsum = a.xsum + t * a.nb;
    for (int64_t r = r_begin; r < r_end; ++r) {
      const uint8_t* row = data + r * row_bytes;
      float dacc[32] = {}, macc[4] = {};
      for (int64_t b = 0; b < nb_used; ++b) {
        const int64_t g = b / spg;
        const int k = static_cast<int>(b % spg);
        const GroupAffine ga = ParseGroup(fi.header, fi.bits, row + g * fi.block_bytes, fmt::LoadF16);
        // int sym: m = c d with c = -2^(bits-1); its M chain takes c S_b and D's scale (canonical order).
        const float ds = ga.d * dx[b], ms = sym ? ds : ga.m * dx[b];
        float* dl = dacc + (b % 4) * 8;
        for (int l = 0; l < 8; ++l) {
          int lane = 0;
          for (int i = 4 * l; i < 4 * l + 4; ++i) lane += CodeAt(fi, ga, k * kBlock + i) * xq[b * kBlock + i];
          dl[l] = std::fma(static_cast<float>(lane), ds, dl[l]);
        }
        macc[b % 4] = std::fma(sym ? xsum[b] * sym_c : xsum[b], ms, macc[b % 4]);
      }
      y[t * ldy + r] = Reduce32(dacc) + ((macc[0] + macc[1]) + (macc[2] + macc[3]));
    }
  }
}

void RowsAmxOrderScalar(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                        int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  const FormatInfo fi = Describe(f);
  const int64_t row_bytes = f.RowBytes(a.cols);
  const int spg = fi.group / kBlock;
  const int64_t nb_used = (a.cols + kBlock - 1) / kBlock;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int8_t* xq = a.xq + t * a.nb * kBlock;
    const float* dx = a.dx + t * a.nb;
    const float* dxs = a.dxs + t * a.nb;
    for (int64_t r = r_begin; r < r_end; ++r) {
      const uint8_t* row = data + r * row_bytes;
      float acc = 0.0f;
      GroupAffine ga{};
      for (int64_t b = 0; b < a.nb; ++b) {
        const int64_t g = b / spg;
        const int k = static_cast<int>(b % spg);
        // The padding block (b >= nb_used, xq = dx = dxs = 0) belongs to the
        // last group (group > 32) or, for 32-column groups, to a group of
        // d = m = 0: exactly what the tile kernel's parameter arrays hold.
        if (k == 0)
          ga = b < nb_used ? ParseGroup(fi.header, fi.bits, row + g * fi.block_bytes, fmt::LoadF16) : GroupAffine{};
        int32_t dot = 0;
        if (b < nb_used)
          for (int i = 0; i < kBlock; ++i) dot += CodeAt(fi, ga, k * kBlock + i) * xq[b * kBlock + i];
        const float ds = ga.d * dx[b];
        acc = std::fma(static_cast<float>(dot), ds, acc);
        if ((b + 1) % spg == 0 || b + 1 == a.nb) {
          float gsum = 0.0f;
          for (int64_t j = g * spg; j <= b; ++j) gsum += dxs[j];
          acc = std::fma(ga.m, gsum, acc);
        }
      }
      y[t * ldy + r] = acc;
    }
  }
}

}  // namespace qmm

// ------------------------------------------------------------ dispatch ---

bool QIsaSupported(QIsa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (isa) {
    case QIsa::kScalar: return true;
    case QIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case QIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
    case QIsa::kAmx: return QIsaSupported(QIsa::kAvx512) && qmm::AmxSupported();
  }
  return false;
#else
  return isa == QIsa::kScalar;
#endif
}

const char* QIsaName(QIsa isa) {
  switch (isa) {
    case QIsa::kAmx: return "amx";
    case QIsa::kAvx512: return "avx512";
    case QIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

QIsa ActiveQIsa() {
  static const bool has512 = QIsaSupported(QIsa::kAvx512);
  static const bool has2 = QIsaSupported(QIsa::kAvx2);
  // NIBBLE_QMATMUL_ISA=scalar|avx2|avx512 overrides for these kernels only
  // (the fp32 ops keep ActiveIsa()): isolates the packed kernels in A/B runs.
  static const char* const own = std::getenv("NIBBLE_QMATMUL_ISA");
  const std::string_view isa = own != nullptr ? own : ActiveIsa();
  if (isa == "avx512") return has512 ? QIsa::kAvx512 : has2 ? QIsa::kAvx2 : QIsa::kScalar;
  if (isa == "avx2") return has2 ? QIsa::kAvx2 : QIsa::kScalar;
  return QIsa::kScalar;
}

namespace {

qmm::RowsKernel KernelFor(QIsa isa) {
#if defined(__x86_64__)
  if (isa == QIsa::kAvx512 || isa == QIsa::kAmx) return qmm::RowsAvx512;
  if (isa == QIsa::kAvx2) return qmm::RowsAvx2;
#endif
  return qmm::RowsScalar;
}

// The packed value of column c of one packed row (blocks.h formulas, i.e.
// exactly what DequantizeRowRef gives).
float PackedValueInRow(const fmt::Format& f, const uint8_t* row, int64_t c) {
  const uint8_t* block = row + (c / f.group) * f.BlockBytes();
  const int i = static_cast<int>(c % f.group);
  const float a = fmt::LoadF16(block);
  switch (f.kind) {
    case fmt::Kind::kInt: {
      const uint8_t* codes = block + fmt::IntHeaderBytes(f.symmetric);
      const int q = fmt::GetIntCode(codes, f.bits, f.group, i);
      return f.symmetric ? fmt::IntSymValue(a, f.bits, q) : fmt::IntAsymValue(a, fmt::LoadF16(block + 2), q);
    }
    case fmt::Kind::kTernary: return fmt::TernaryValue(a, fmt::GetCode(block + fmt::kTernaryHeaderBytes, 2, i));
    case fmt::Kind::kBinary: return fmt::BinaryValue(a, fmt::GetCode(block + fmt::kBinaryHeaderBytes, 1, i));
    case fmt::Kind::kBinTern: {
      const uint8_t* codes = block + fmt::kBinTernHeaderBytes;
      return fmt::BinTernIsTernary(block) ? fmt::TernaryValue(a, fmt::GetCode(codes, 2, i))
                                          : fmt::BinaryValue(a, fmt::GetCode(codes, 1, i));
    }
    case fmt::Kind::kNl:
      return fmt::NlValue(a, f.bits, fmt::GetIntCode(block + fmt::kNlHeaderBytes, f.bits, f.group, i));
  }
  return 0.0f;
}

const QSegmentView& SegmentOf(const QMatrixView& w, int64_t r) {
  for (const QSegmentView& s : w.segments)
    if (r >= s.row_begin && r < s.row_end) return s;
  return w.segments.back();
}

float KeptValue(const QSidecarView& sc, int64_t r, uint32_t i) {
  if (sc.type == QSidecarView::Type::kF16) return Fp16ToFp32(sc.f16[i]);
  return Fp16ToFp32(sc.row_scale[r]) * static_cast<float>(sc.i8[i]);
}

// Fills the AMX kernel's per-call activation extras (qmm::AmxActs) from the
// quantized activations in `s`: tile-major xq, token-transposed dx, and the
// dxs group sums G_g of the AMX order for group sizes of 1, 2, 4 blocks
// (summed in block order from +0). Padding tokens (up to a multiple of 16)
// are zero. O(n_tokens * nb), single thread; grows s's AMX buffers only.
void PrepareAmxActs(QMatMulScratch::Impl* s, int64_t n_tokens, int64_t nb, qmm::AmxActs* out_acts) {
  constexpr int64_t kT = qmm::kAmxTokenTile;
  const int64_t tiles = (n_tokens + kT - 1) / kT, t_alloc = tiles * kT;
  const size_t xq_bytes = static_cast<size_t>(t_alloc * nb * qmm::kBlock);
  if (s->amx_xq.size() < xq_bytes + 64) s->amx_xq.resize(xq_bytes + 64);
  int8_t* xqt = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(s->amx_xq.data()) + 63) & ~uintptr_t{63});
  for (int64_t t = 0; t < t_alloc; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* dst = xqt + (((t / kT) * nb + b) * kT + t % kT) * qmm::kBlock;
      if (t < n_tokens) {
        std::memcpy(dst, s->xq + (t * nb + b) * qmm::kBlock, qmm::kBlock);
      } else {
        std::memset(dst, 0, qmm::kBlock);
      }
    }
  }
  out_acts->xqt = xqt;
  const auto at = [&](const float* v, int64_t t, int64_t b) { return t < n_tokens ? v[t * nb + b] : 0.0f; };
  int64_t need = tiles * nb * kT;
  for (int l = 0; l < 3; ++l) need += tiles * ((nb + (1 << l) - 1) >> l) * kT;
  if (static_cast<int64_t>(s->amx_gdxs.size()) < need) s->amx_gdxs.resize(static_cast<size_t>(need));
  float* out = s->amx_gdxs.data();
  out_acts->dxt = out;
  for (int64_t t = 0; t < t_alloc; ++t)
    for (int64_t b = 0; b < nb; ++b) out[((t / kT) * nb + b) * kT + t % kT] = at(s->dx, t, b);
  out += tiles * nb * kT;
  for (int l = 0; l < 3; ++l) {
    const int64_t spg = int64_t{1} << l, ng = (nb + spg - 1) / spg;
    out_acts->gdxs[l] = out;
    out_acts->ng[l] = ng;
    for (int64_t t = 0; t < t_alloc; ++t) {
      for (int64_t g = 0; g < ng; ++g) {
        float sum = 0.0f;
        for (int64_t b = g * spg; b < std::min(nb, g * spg + spg); ++b) sum += at(s->dxs, t, b);
        out[((t / kT) * ng + g) * kT + t % kT] = sum;
      }
    }
    out += tiles * ng * kT;
  }
}

// How RunRows computes the packed part: `kernel` for every segment, except
// segments whose format qmm::AmxCovers when `amx` (the tile kernel, whole
// row range at once: it tiles rows itself) or `amx_ref` (its scalar order)
// is set.
struct RowsPlan {
  qmm::RowsKernel kernel = nullptr;
  const qmm::AmxActs* amx = nullptr;
  qmm::RowsKernel amx_ref = nullptr;
};

// Rows [rb, re) for all tokens: packed part per segment, then the side-car.
void RunRows(const RowsPlan& plan, const QMatrixView& w, const qmm::QActs& a, float* y, int64_t rb, int64_t re) {
  const bool tiles = plan.amx != nullptr || plan.amx_ref != nullptr;
  if (tiles) {
    for (const QSegmentView& s : w.segments) {
      const int64_t lo = std::max(rb, s.row_begin), hi = std::min(re, s.row_end);
      if (lo >= hi || !qmm::AmxCovers(s.format)) continue;
      if (plan.amx != nullptr) {
        qmm::RowsAmx(s.format, s.data, lo - s.row_begin, hi - s.row_begin, a, *plan.amx, y + s.row_begin, w.rows);
      } else {
        plan.amx_ref(s.format, s.data, lo - s.row_begin, hi - s.row_begin, a, 0, a.n_tokens, y + s.row_begin,
                     w.rows);
      }
    }
  }
  // Prefill: 32-row chunks keep their rows hot in L1/L2 across token tiles.
  // Decode (one token) reads each row once: one call over the whole range, so
  // the kernel's software prefetch runs ahead across chunk boundaries instead
  // of restarting cold every 32 rows.
  constexpr int64_t kRowChunk = 32;
  const int64_t chunk = a.n_tokens == 1 ? re - rb : kRowChunk;
  for (int64_t c0 = rb; c0 < re; c0 += chunk) {
    const int64_t c1 = std::min(re, c0 + chunk);
    for (const QSegmentView& s : w.segments) {
      const int64_t lo = std::max(c0, s.row_begin), hi = std::min(c1, s.row_end);
      if (lo >= hi || (tiles && qmm::AmxCovers(s.format))) continue;
      plan.kernel(s.format, s.data, lo - s.row_begin, hi - s.row_begin, a, 0, a.n_tokens, y + s.row_begin, w.rows);
    }
  }
  const QSidecarView& sc = w.sidecar;
  if (sc.type == QSidecarView::Type::kNone) return;
  for (int64_t r = rb; r < re; ++r) {
    const uint32_t b = sc.row_ptr[r], e = sc.row_ptr[r + 1];
    if (b == e) continue;
    const QSegmentView& s = SegmentOf(w, r);
    const uint8_t* row = s.data + (r - s.row_begin) * s.format.RowBytes(w.cols);
    for (uint32_t i = b; i < e; ++i) {
      const int64_t c = sc.col[i];
      const float delta = KeptValue(sc, r, i) - PackedValueInRow(s.format, row, c);
      for (int64_t t = 0; t < a.n_tokens; ++t) y[t * w.rows + r] += delta * a.x[t * w.cols + c];
    }
  }
}

}  // namespace

namespace {

// QuantMatMul on `isa`'s kernels over several matrices of the same input
// width sharing x (ys[i] receives ws[i]'s product): the activations are
// quantized once and one parallel region covers the rows of all of them
// (the matrices' rows concatenated), so a decode step pays one fork/join for
// e.g. wq/wk/wv. Every output is computed exactly as by a call on its matrix
// alone (the kernels' per-output order does not depend on the row split).
// QIsa::kAmx: the AMX kernel for segments it covers (AVX-512 VNNI for the
// others); amx_ref: the AMX order in scalar code instead
// (QuantMatMulAmxOrderRef; isa must be kScalar).
void QuantMatMulImpl(QIsa isa, bool amx_ref, std::span<const QMatrixView> ws, const float* x, int64_t n_tokens,
                     float* const* ys, ThreadPool* pool, QMatMulScratch* scratch) {
  if (n_tokens <= 0 || ws.empty() || ws[0].cols <= 0) return;
  const int64_t cols = ws[0].cols;
  int64_t total_rows = 0;
  for (const QMatrixView& w : ws) total_rows += w.rows;
  if (total_rows <= 0) return;
  QMatMulScratch::Impl* s = scratch->impl();
  const int64_t nb = (cols + 63) / 64 * 2;
  const bool amx = isa == QIsa::kAmx;
  s->Reserve(n_tokens * nb);
  const auto quantize = [&](int64_t t0, int64_t t1) {
    qmm::QuantizeActs(x + t0 * cols, t1 - t0, cols, nb, s->xq + t0 * nb * qmm::kBlock, s->dx + t0 * nb,
                      s->dxs + t0 * nb, s->dx16 + t0 * nb * 8, s->xs4 + t0 * nb * 8, s->xsum + t0 * nb);
  };
  // Per-token work: prefill splits it over the pool (same bytes either way).
  if (pool != nullptr && pool->size() > 1 && n_tokens >= 32)
    pool->ParallelFor(n_tokens, 16, [&](int, int64_t b, int64_t e) { quantize(b, e); });
  else
    quantize(0, n_tokens);
  qmm::AmxActs amx_acts;
  if (amx) PrepareAmxActs(s, n_tokens, nb, &amx_acts);
  qmm::QActs a;
  a.n_tokens = n_tokens;
  a.cols = cols;
  a.nb = nb;
  a.xq = s->xq;
  a.dx = s->dx;
  a.dxs = s->dxs;
  a.dx16 = s->dx16;
  a.xs4 = s->xs4;
  a.xsum = s->xsum;
  a.x = x;
  RowsPlan plan;
  plan.kernel = KernelFor(isa);
  if (amx) plan.amx = &amx_acts;
  if (amx_ref) plan.amx_ref = qmm::RowsAmxOrderScalar;
  // Concatenated rows [b, e) -> each matrix's part of them.
  const auto run = [&](int64_t b, int64_t e) {
    int64_t off = 0;
    for (size_t i = 0; i < ws.size() && off < e; off += ws[i].rows, ++i) {
      const int64_t lo = std::max(b, off), hi = std::min(e, off + ws[i].rows);
      if (lo < hi) RunRows(plan, ws[i], a, ys[i], lo - off, hi - off);
    }
  };
  if (pool == nullptr || pool->size() == 1 || total_rows * cols * n_tokens < 65536) {
    run(0, total_rows);
    return;
  }
  // 16 rows per grain: each thread's output runs cover whole 64-byte lines
  // and whole 16-row AMX strips (for matrices of a multiple of 16 rows).
  pool->ParallelFor(total_rows, 16, [&](int, int64_t b, int64_t e) { run(b, e); });
}

QIsa CallIsa(int64_t n_tokens) {
  const QIsa isa = ActiveQIsa();
  return isa == QIsa::kAvx512 && qmm::AmxWanted(n_tokens) ? QIsa::kAmx : isa;
}

}  // namespace

void QuantMatMulIsa(QIsa isa, const QMatrixView& w, const float* x, int64_t n_tokens, float* y, ThreadPool* pool,
                    QMatMulScratch* scratch) {
  QuantMatMulImpl(isa, false, {&w, 1}, x, n_tokens, &y, pool, scratch);
}

void QuantMatMul(const QMatrixView& w, const float* x, int64_t n_tokens, float* y, ThreadPool* pool,
                 QMatMulScratch* scratch) {
  QuantMatMulImpl(CallIsa(n_tokens), false, {&w, 1}, x, n_tokens, &y, pool, scratch);
}

void QuantMatMulMany(std::span<const QMatrixView> ws, const float* x, int64_t n_tokens, std::span<float* const> ys,
                     ThreadPool* pool, QMatMulScratch* scratch) {
  QuantMatMulImpl(CallIsa(n_tokens), false, ws, x, n_tokens, ys.data(), pool, scratch);
}

bool QuantMatMulTakesAmx(int64_t n_tokens) { return CallIsa(n_tokens) == QIsa::kAmx; }

namespace {
// Row r of w dequantized to fp32 with the side-car applied (QuantMatMulF32Ref's
// row), decoded on `isa`'s twin of DequantizeRowRef (same bits).
void DequantizedRow(const QMatrixView& w, int64_t r, float* row, QIsa isa = QIsa::kScalar) {
  const QSegmentView& s = SegmentOf(w, r);
  const uint8_t* packed = s.data + (r - s.row_begin) * s.format.RowBytes(w.cols);
  if (isa == QIsa::kAvx512 || isa == QIsa::kAmx) {
    qmm::DequantRowAvx512(s.format, packed, w.cols, row);
  } else if (isa == QIsa::kAvx2) {
    qmm::DequantRowAvx2(s.format, packed, w.cols, row);
  } else {
    fmt::DequantizeRowRef(s.format, packed, w.cols, row);
  }
  const QSidecarView& sc = w.sidecar;
  if (sc.type != QSidecarView::Type::kNone)
    for (uint32_t i = sc.row_ptr[r]; i < sc.row_ptr[r + 1]; ++i) row[sc.col[i]] = KeptValue(sc, r, i);
}
}  // namespace

void QuantMatMulDequantF32(const QMatrixView& w, const float* x, int64_t n_tokens, float* y, ThreadPool* pool) {
  const QIsa isa = ActiveQIsa();
  MatMulF32Filled(
      [&w, isa](int64_t r0, int64_t nr, float* dst) {
        for (int64_t i = 0; i < nr; ++i) DequantizedRow(w, r0 + i, dst + i * w.cols, isa);
      },
      w.rows, w.cols, x, n_tokens, y, pool);
}

void QuantMatMulAmxOrderRef(const QMatrixView& w, const float* x, int64_t n_tokens, float* y) {
  QMatMulScratch scratch;
  QuantMatMulImpl(QIsa::kScalar, true, {&w, 1}, x, n_tokens, &y, nullptr, &scratch);
}

// ------------------------------------------------------------ references ---

float PackedWeightAt(const QMatrixView& w, int64_t r, int64_t c) {
  const QSegmentView& s = SegmentOf(w, r);
  return PackedValueInRow(s.format, s.data + (r - s.row_begin) * s.format.RowBytes(w.cols), c);
}

void QuantMatMulF32Ref(const QMatrixView& w, const float* x, int64_t n_tokens, float* y) {
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    DequantizedRow(w, r, row.data());
    for (int64_t t = 0; t < n_tokens; ++t) {
      float acc = 0.0f;
      for (int64_t c = 0; c < w.cols; ++c) acc += row[c] * x[t * w.cols + c];
      y[t * w.rows + r] = acc;
    }
  }
}

// ------------------------------------------------------------ validation ---

bool ValidateQMatrix(const QMatrixView& w, std::string* error) {
  auto fail = [&](const std::string& m) {
    if (error) *error = m;
    return false;
  };
  if (w.rows < 1 || w.cols < 1 || w.cols > 65536) return fail("rows/cols out of range");
  if (w.segments.empty()) return fail("segments: none");
  int64_t next = 0;
  for (size_t i = 0; i < w.segments.size(); ++i) {
    const QSegmentView& s = w.segments[i];
    const std::string where = "segments[" + std::to_string(i) + "]";
    if (s.row_begin != next || s.row_end <= s.row_begin) return fail(where + ": rows not contiguous");
    if (s.format.BlockBytes() == 0) return fail(where + ": format not in AllFormats()");
    if (s.data == nullptr) return fail(where + ": null data");
    next = s.row_end;
  }
  if (next != w.rows) return fail("segments: cover " + std::to_string(next) + " of " + std::to_string(w.rows) + " rows");
  const QSidecarView& sc = w.sidecar;
  if (sc.type == QSidecarView::Type::kNone) return true;
  if (sc.row_ptr == nullptr || sc.col == nullptr) return fail("sidecar: null row_ptr/col");
  if (sc.type == QSidecarView::Type::kF16 && sc.f16 == nullptr) return fail("sidecar: null f16 values");
  if (sc.type == QSidecarView::Type::kI8 && (sc.i8 == nullptr || sc.row_scale == nullptr))
    return fail("sidecar: null i8 values/row_scale");
  for (int64_t r = 0; r < w.rows; ++r) {
    if (sc.row_ptr[r + 1] < sc.row_ptr[r]) return fail("sidecar: row_ptr decreases at row " + std::to_string(r));
    for (uint32_t i = sc.row_ptr[r]; i < sc.row_ptr[r + 1]; ++i)
      if (sc.col[i] >= w.cols) return fail("sidecar: column out of range at row " + std::to_string(r));
  }
  return true;
}

}  // namespace nibble::cpu
