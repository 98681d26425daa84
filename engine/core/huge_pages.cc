#include "engine/core/huge_pages.h"

#include <cstdlib>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "engine/core/quant_tensor.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace nibble {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kAlign = 64;

size_t RoundUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

template <typename T>
size_t SpanBytes(std::span<const T> s) {
  return RoundUp(s.size_bytes(), kAlign);
}

// Copies s to arena + *off and returns the new span.
template <typename T>
std::span<const T> Place(std::span<const T> s, uint8_t* arena, size_t* off) {
  if (s.empty()) return s;
  uint8_t* dst = arena + *off;
  std::memcpy(dst, s.data(), s.size_bytes());
  *off += SpanBytes(s);
  return std::span<const T>(reinterpret_cast<const T*>(dst), s.size());
}

template <typename F>
void ForEachMatrix(ModelWeights* w, F f) {
  f(&w->tok_embeddings);
  f(&w->output);
  for (LayerWeights& l : w->layers)
    for (HostTensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) f(t);
}

}  // namespace

std::shared_ptr<void> HugePageAlloc(size_t bytes, bool zero) {
  const size_t n = RoundUp(std::max<size_t>(bytes, 1), kHugePage);
  void* p = std::aligned_alloc(kHugePage, n);
  if (p == nullptr) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, n, MADV_HUGEPAGE);  // advice only: failure leaves small pages
#endif
  if (zero) std::memset(p, 0, n);
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

bool HugePagesAllowedByEnv() {
  const char* env = std::getenv("NIBBLE_HUGE_PAGES");
  return !(env != nullptr && std::string_view(env) == "0");
}

size_t MoveF32ToHugePages(ModelWeights* w) {
  size_t total = 0;
  ForEachMatrix(w, [&](HostTensor* t) {
    if (t->quant == nullptr && !t->data.empty()) total += RoundUp(t->data.size() * sizeof(float), 64);
  });
  if (total == 0) return 0;
  std::shared_ptr<void> arena = HugePageAlloc(total, /*zero=*/false);
  if (arena == nullptr) return 0;
  auto* base = static_cast<uint8_t*>(arena.get());
  size_t off = 0;
  ForEachMatrix(w, [&](HostTensor* t) {
    if (t->quant != nullptr || t->data.empty()) return;
    t->f32 = Place(std::span<const float>(t->data), base, &off);
    t->owner = arena;
    std::vector<float>().swap(t->data);
  });
  return total;
}

size_t MoveQuantizedToHugePages(ModelWeights* w) {
  size_t total = 0;
  ForEachMatrix(w, [&](HostTensor* t) {
    total += SpanBytes(t->f16) + SpanBytes(t->bf16);
    if (t->quant == nullptr) return;
    for (const QuantSegment& s : t->quant->segments) total += SpanBytes(s.data);
    const Sidecar& c = t->quant->sidecar;
    total += SpanBytes(c.row_ptr) + SpanBytes(c.col) + SpanBytes(c.f16) + SpanBytes(c.i8) + SpanBytes(c.row_scale);
  });
  if (total == 0) return 0;
  std::shared_ptr<void> arena = HugePageAlloc(total);
  if (arena == nullptr) return 0;
  auto* base = static_cast<uint8_t*>(arena.get());
  size_t off = 0;
  ForEachMatrix(w, [&](HostTensor* t) {
    if (!t->f16.empty() || !t->bf16.empty()) {
      t->f16 = Place(t->f16, base, &off);
      t->bf16 = Place(t->bf16, base, &off);
      t->owner = arena;
    }
    if (t->quant == nullptr) return;
    auto q = std::make_shared<QuantTensor>(*t->quant);
    for (QuantSegment& s : q->segments) s.data = Place(s.data, base, &off);
    Sidecar& c = q->sidecar;
    c.row_ptr = Place(c.row_ptr, base, &off);
    c.col = Place(c.col, base, &off);
    c.f16 = Place(c.f16, base, &off);
    c.i8 = Place(c.i8, base, &off);
    c.row_scale = Place(c.row_scale, base, &off);
    q->owners = {arena};
    t->quant = std::move(q);
  });
  return total;
}

}  // namespace nibble
