// Test-only helpers: write small synthetic GGUF files (see gguf_test.cc).
// Header-only so it needs no library; not used by production code.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "kernels/common/fp16.h"

namespace nibble::io::testing {

class Bytes {
 public:
  Bytes& U8(uint8_t v) { return Raw(&v, 1); }
  Bytes& U32(uint32_t v) { return Raw(&v, 4); }
  Bytes& I32(int32_t v) { return Raw(&v, 4); }
  Bytes& U64(uint64_t v) { return Raw(&v, 8); }
  Bytes& F32(float v) { return Raw(&v, 4); }
  Bytes& Str(const std::string& s) {
    U64(s.size());
    s_ += s;
    return *this;
  }
  Bytes& Raw(const void* p, size_t n) {
    s_.append(static_cast<const char*>(p), n);
    return *this;
  }
  Bytes& Append(const std::string& s) {
    s_ += s;
    return *this;
  }
  const std::string& str() const { return s_; }

 private:
  std::string s_;
};

// One metadata entry, already encoded as {type, value} after the key.
struct Kv {
  std::string key;
  std::string encoded;
};

inline Kv KvU32(const std::string& k, uint32_t v) { return {k, Bytes().U32(4).U32(v).str()}; }
inline Kv KvI32(const std::string& k, int32_t v) { return {k, Bytes().U32(5).I32(v).str()}; }
inline Kv KvU64(const std::string& k, uint64_t v) { return {k, Bytes().U32(10).U64(v).str()}; }
inline Kv KvF32(const std::string& k, float v) { return {k, Bytes().U32(6).F32(v).str()}; }
inline Kv KvBool(const std::string& k, bool v) { return {k, Bytes().U32(7).U8(v).str()}; }
inline Kv KvStr(const std::string& k, const std::string& v) { return {k, Bytes().U32(8).Str(v).str()}; }
inline Kv KvStrArr(const std::string& k, const std::vector<std::string>& v) {
  Bytes b;
  b.U32(9).U32(8).U64(v.size());
  for (const auto& s : v) b.Str(s);
  return {k, b.str()};
}
inline Kv KvF32Arr(const std::string& k, const std::vector<float>& v) {
  Bytes b;
  b.U32(9).U32(6).U64(v.size());
  for (float f : v) b.F32(f);
  return {k, b.str()};
}
inline Kv KvI32Arr(const std::string& k, const std::vector<int32_t>& v) {
  Bytes b;
  b.U32(9).U32(5).U64(v.size());
  for (int32_t x : v) b.I32(x);
  return {k, b.str()};
}

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type = 0;             // ggml type id
  std::string data;              // encoded bytes
  std::vector<float> expected;   // dequantized values
  std::optional<uint64_t> offset;  // override the computed offset
};

// F32 tensor with values f(i) = base + 0.125 * (i % 29).
inline TensorSpec F32Tensor(const std::string& name, std::vector<uint64_t> ne, float base) {
  TensorSpec t{name, ne, 0, "", {}, std::nullopt};
  uint64_t n = 1;
  for (uint64_t d : ne) n *= d;
  for (uint64_t i = 0; i < n; ++i) {
    const float v = base + 0.125f * static_cast<float>(i % 29);
    t.expected.push_back(v);
    t.data.append(reinterpret_cast<const char*>(&v), 4);
  }
  return t;
}

// F16 tensor (values exactly representable in fp16).
inline TensorSpec F16Tensor(const std::string& name, std::vector<uint64_t> ne, float base) {
  TensorSpec t = F32Tensor(name, ne, base);
  t.type = 1;
  t.data.clear();
  for (float v : t.expected) {
    const uint16_t h = Fp32ToFp16(v);
    t.data.append(reinterpret_cast<const char*>(&h), 2);
  }
  return t;
}

// Q8_0 tensor: every block has d = 0.5 and q[j] = (j + block) % 19 - 9.
inline TensorSpec Q8Tensor(const std::string& name, std::vector<uint64_t> ne) {
  TensorSpec t{name, ne, 8, "", {}, std::nullopt};
  uint64_t n = 1;
  for (uint64_t d : ne) n *= d;
  const uint16_t d = Fp32ToFp16(0.5f);
  for (uint64_t b = 0; b < n / 32; ++b) {
    t.data.append(reinterpret_cast<const char*>(&d), 2);
    for (int j = 0; j < 32; ++j) {
      const int8_t q = static_cast<int8_t>((j + b) % 19 - 9);
      t.data.push_back(static_cast<char>(q));
      t.expected.push_back(0.5f * q);
    }
  }
  return t;
}

struct GgufSpec {
  uint32_t version = 3;
  std::vector<Kv> kvs;
  std::vector<TensorSpec> tensors;
  uint64_t alignment = 32;
  std::optional<uint64_t> n_tensors_override, n_kv_override;
};

inline std::string WriteGguf(const GgufSpec& spec) {
  Bytes b;
  b.Raw("GGUF", 4).U32(spec.version);
  b.U64(spec.n_tensors_override.value_or(spec.tensors.size()));
  b.U64(spec.n_kv_override.value_or(spec.kvs.size()));
  for (const Kv& kv : spec.kvs) b.Str(kv.key).Append(kv.encoded);
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const TensorSpec& t : spec.tensors) {
    b.Str(t.name).U32(static_cast<uint32_t>(t.ne.size()));
    for (uint64_t d : t.ne) b.U64(d);
    b.U32(t.type);
    offsets.push_back(offset);
    b.U64(t.offset.value_or(offset));
    offset += (t.data.size() + spec.alignment - 1) / spec.alignment * spec.alignment;
  }
  std::string out = b.str();
  out.resize((out.size() + spec.alignment - 1) / spec.alignment * spec.alignment, '\0');
  const size_t data_start = out.size();
  for (size_t i = 0; i < spec.tensors.size(); ++i) {
    out.resize(data_start + offsets[i], '\0');
    out += spec.tensors[i].data;
  }
  return out;
}

// A tiny but complete llama model: dim 32, ffn 64, 2 layers, 4 heads (2 kv),
// head_dim 8, vocab 6, SentencePiece-style vocabulary, untied output.
// attn_q is Q8_0 and the FFN weights F16; everything else F32.
inline GgufSpec TinyLlama() {
  GgufSpec s;
  s.kvs = {KvStr("general.architecture", "llama"),
           KvStr("general.name", "tiny"),
           KvU32("llama.embedding_length", 32),
           KvU32("llama.feed_forward_length", 64),
           KvU32("llama.block_count", 2),
           KvU32("llama.attention.head_count", 4),
           KvU32("llama.attention.head_count_kv", 2),
           KvF32("llama.attention.layer_norm_rms_epsilon", 1e-6f),
           KvU32("llama.context_length", 128),
           KvStr("tokenizer.ggml.model", "llama"),
           KvStrArr("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "\xe2\x96\x81hi", "a", "<0x0A>"}),
           KvF32Arr("tokenizer.ggml.scores", {0, 0, 0, -1.5f, -2.5f, 0}),
           KvI32Arr("tokenizer.ggml.token_type", {2, 3, 3, 1, 1, 6}),
           KvStr("tokenizer.chat_template", "{{ messages }}")};
  s.tensors.push_back(F32Tensor("token_embd.weight", {32, 6}, -1.0f));
  s.tensors.push_back(F32Tensor("output_norm.weight", {32}, 1.0f));
  s.tensors.push_back(F32Tensor("output.weight", {32, 6}, -0.5f));
  for (int l = 0; l < 2; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    const float base = static_cast<float>(l);
    s.tensors.push_back(F32Tensor(p + "attn_norm.weight", {32}, base + 0.25f));
    s.tensors.push_back(Q8Tensor(p + "attn_q.weight", {32, 32}));
    s.tensors.push_back(F32Tensor(p + "attn_k.weight", {32, 16}, base - 0.5f));
    s.tensors.push_back(F32Tensor(p + "attn_v.weight", {32, 16}, base - 0.75f));
    s.tensors.push_back(F32Tensor(p + "attn_output.weight", {32, 32}, base - 1.0f));
    s.tensors.push_back(F32Tensor(p + "ffn_norm.weight", {32}, base + 0.5f));
    s.tensors.push_back(F16Tensor(p + "ffn_gate.weight", {32, 64}, base - 1.5f));
    s.tensors.push_back(F16Tensor(p + "ffn_up.weight", {32, 64}, base - 1.25f));
    s.tensors.push_back(F16Tensor(p + "ffn_down.weight", {64, 32}, base - 1.75f));
  }
  return s;
}

}  // namespace nibble::io::testing
