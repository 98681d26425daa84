// GGUF container and llama model loading: SmolLM2 against the Python gguf
// package (tests/fixtures/gen_smollm2_rows.py), synthetic files for the
// metadata types, and malformed inputs that must fail cleanly.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <sstream>

#include "engine/io/gguf.h"
#include "engine/io/gguf_model.h"
#include "engine/io/gguf_test_util.h"
#include "gtest/gtest.h"
#include "kernels/common/fp16.h"
#include "tests/test_util.h"

namespace nibble::io {
namespace {

using namespace nibble::io::testing;  // NOLINT
using ::nibble::testing::SmolLM2Gguf;
using ::nibble::testing::SourceDir;
using ::nibble::testing::WriteTempFile;

// Removes the temporary directory holding `path` when it goes out of scope.
struct TempCleanup {
  std::string path;
  ~TempCleanup() { std::filesystem::remove_all(std::filesystem::path(path).parent_path()); }
};

bool Contains(const absl::Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

absl::StatusOr<std::unique_ptr<GgufFile>> ParseString(const std::string& s, const std::string& name = "mem.gguf") {
  return GgufFile::Parse(reinterpret_cast<const uint8_t*>(s.data()), s.size(), name);
}

// Loads through a real file and checks the failure names it.
void ExpectLoadFails(const std::string& bytes, const std::string& must_mention = "") {
  const std::string path = WriteTempFile("bad.gguf", bytes);
  TempCleanup cleanup{path};
  auto m = LoadGgufModel(path);
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(Contains(m.status(), path)) << m.status();
  if (!must_mention.empty()) {
    EXPECT_TRUE(Contains(m.status(), must_mention)) << m.status();
  }
}

const HostTensor& Weight(const LoadedModel& m, const std::string& name) {
  if (name == "token_embd.weight") return m.weights.tok_embeddings;
  if (name == "output_norm.weight") return m.weights.final_norm;
  if (name == "output.weight") return m.weights.output;
  const int layer = std::stoi(name.substr(4));
  const LayerWeights& l = m.weights.layers.at(layer);
  const std::string t = name.substr(name.find('.', 4) + 1);
  if (t == "attn_norm.weight") return l.attn_norm;
  if (t == "attn_q.weight") return l.wq;
  if (t == "attn_k.weight") return l.wk;
  if (t == "attn_v.weight") return l.wv;
  if (t == "attn_output.weight") return l.wo;
  if (t == "ffn_norm.weight") return l.ffn_norm;
  if (t == "ffn_gate.weight") return l.w_gate;
  if (t == "ffn_up.weight") return l.w_up;
  return l.w_down;
}

TEST(GgufModelTest, SmolLM2MatchesPythonGguf) {
  auto path = SmolLM2Gguf();
  if (!path) GTEST_SKIP() << "SmolLM2 GGUF not present";
  const auto t0 = std::chrono::steady_clock::now();
  auto m = LoadGgufModel(*path);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_LT(secs, 10.0);
  const ModelConfig& c = m->config;
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.dim, 576);
  EXPECT_EQ(c.hidden_dim, 1536);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.rope_dim, 64);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_seq_len, 8192);
  EXPECT_FLOAT_EQ(c.rope_theta, 100000.0f);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(c.rope_style, RopeStyle::kInterleaved);
  EXPECT_TRUE(m->weights.output.empty());
  EXPECT_EQ(m->source_format, "gguf");

  const VocabSpec& v = m->vocab;
  EXPECT_EQ(v.kind, TokenizerKind::kGpt2Bpe);
  ASSERT_EQ(v.tokens.size(), 49152u);
  EXPECT_EQ(v.merges.size(), 48900u);
  EXPECT_EQ(v.pre, "smollm");
  EXPECT_EQ(v.tokens[2], "<|im_end|>");
  EXPECT_EQ(v.bos_id, 1);
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_EQ(v.pad_id, 2);
  EXPECT_FALSE(v.add_bos);
  EXPECT_FALSE(v.add_space_prefix);
  EXPECT_FALSE(v.strip_space_after_bos);
  EXPECT_EQ(v.token_types[2], TokenType::kControl);
  EXPECT_NE(std::find(v.eog_ids.begin(), v.eog_ids.end(), 0), v.eog_ids.end());  // <|endoftext|>
  EXPECT_NE(std::find(v.eog_ids.begin(), v.eog_ids.end(), 2), v.eog_ids.end());  // <|im_end|>
  EXPECT_EQ(m->chat_template.rfind("{% for message in messages %}", 0), 0u);
  EXPECT_EQ(m->metadata.at("general.architecture"), "llama");
  EXPECT_EQ(m->metadata.at("llama.block_count"), "30");

  // Rows against the gguf package's dequantization, bit for bit.
  std::ifstream in(SourceDir() + "/tests/fixtures/smollm2_rows.bin", std::ios::binary);
  ASSERT_TRUE(in) << "missing tests/fixtures/smollm2_rows.bin";
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string fx = ss.str();
  ASSERT_EQ(fx.compare(0, 4, "NBRW"), 0);
  size_t pos = 4;
  auto u32 = [&]() {
    uint32_t x = 0;
    std::memcpy(&x, fx.data() + pos, 4);
    pos += 4;
    return x;
  };
  const uint32_t n = u32();
  EXPECT_GE(n, 8u);
  for (uint32_t e = 0; e < n; ++e) {
    const uint32_t len = u32();
    const std::string name = fx.substr(pos, len);
    pos += len;
    const uint32_t row = u32(), cols = u32();
    const HostTensor& t = Weight(*m, name);
    ASSERT_EQ(t.shape.size() == 1 ? t.shape[0] : t.cols(), cols) << name;
    const float* got = t.data.data() + static_cast<size_t>(row) * cols;
    EXPECT_EQ(std::memcmp(got, fx.data() + pos, 4 * cols), 0) << name << " row " << row;
    pos += 4 * cols;
  }
  EXPECT_EQ(pos, fx.size());
}

TEST(GgufModelTest, SyntheticModelLoads) {
  const GgufSpec spec = TinyLlama();
  const std::string path = WriteTempFile("tiny.gguf", WriteGguf(spec));
  TempCleanup cleanup{path};
  auto m = LoadGgufModel(path);
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = m->config;
  EXPECT_EQ(c.dim, 32);
  EXPECT_EQ(c.hidden_dim, 64);
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.rope_dim, 8);
  EXPECT_EQ(c.vocab_size, 6);  // from the token list (no llama.vocab_size)
  EXPECT_EQ(c.max_seq_len, 128);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-6f);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);  // default
  EXPECT_FALSE(c.tied_embeddings);
  for (const TensorSpec& t : spec.tensors) {
    const HostTensor& h = Weight(*m, t.name);
    if (t.ne.size() == 2) {
      EXPECT_EQ(h.shape, (std::vector<int64_t>{static_cast<int64_t>(t.ne[1]), static_cast<int64_t>(t.ne[0])}));
    }
    EXPECT_EQ(h.data, t.expected) << t.name;
  }
  const VocabSpec& v = m->vocab;
  EXPECT_EQ(v.kind, TokenizerKind::kSpmScores);
  EXPECT_EQ(v.tokens[3], "\xe2\x96\x81hi");
  EXPECT_EQ(v.scores[4], -2.5f);
  EXPECT_EQ(v.token_types[5], TokenType::kByte);
  EXPECT_EQ(v.bos_id, 1);  // llama.cpp SentencePiece defaults
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_EQ(v.unk_id, 0);
  EXPECT_TRUE(v.add_bos);
  EXPECT_TRUE(v.add_space_prefix);
  EXPECT_TRUE(v.strip_space_after_bos);
  EXPECT_EQ(v.eog_ids, (std::vector<int32_t>{2}));
  EXPECT_EQ(m->chat_template, "{{ messages }}");
  EXPECT_EQ(m->metadata.at("general.name"), "tiny");
}

// keep_f16: F16 matrices come back as fp16 (HostTensor::f16) whose exact
// widening is the dequantized value; every other tensor is loaded as before.
TEST(GgufModelTest, KeepF16KeepsF16MatricesAt16Bits) {
  const GgufSpec spec = TinyLlama();
  const std::string path = WriteTempFile("tiny_f16.gguf", WriteGguf(spec));
  TempCleanup cleanup{path};
  auto m = LoadGgufModel(path, /*keep_f16=*/true);
  ASSERT_TRUE(m.ok()) << m.status();
  int kept = 0;
  for (const TensorSpec& t : spec.tensors) {
    const HostTensor& h = Weight(*m, t.name);
    if (t.type == static_cast<uint32_t>(GgmlType::kF16) && t.ne.size() == 2) {
      ++kept;
      ASSERT_TRUE(h.is_f16()) << t.name;
      EXPECT_TRUE(h.data.empty()) << t.name;
      ASSERT_EQ(h.f16.size(), t.expected.size()) << t.name;
      for (size_t i = 0; i < h.f16.size(); ++i) EXPECT_EQ(Fp16ToFp32(h.f16[i]), t.expected[i]) << t.name << " " << i;
      HostTensor copy = h;
      copy.WidenHalf();
      EXPECT_FALSE(copy.is_f16());
      EXPECT_EQ(copy.data, t.expected) << t.name;
    } else {
      EXPECT_FALSE(h.is_f16()) << t.name;
      EXPECT_EQ(h.data, t.expected) << t.name;
    }
  }
  EXPECT_EQ(kept, 6);  // ffn_gate / ffn_up / ffn_down of 2 layers
  EXPECT_TRUE(m->weights.Validate(m->config, path).ok());
}

TEST(GgufTest, MetadataTypesAndCoercion) {
  GgufSpec spec;
  Bytes nested;  // array of 2 arrays of int32: [[1, 2], [-3]]
  nested.U32(9).U32(9).U64(2);
  nested.U32(5).U64(2).I32(1).I32(2);
  nested.U32(5).U64(1).I32(-3);
  Bytes u16arr;
  u16arr.U32(9).U32(2).U64(3);
  for (uint16_t x : {7, 8, 65535}) u16arr.Raw(&x, 2);
  spec.kvs = {KvU32("u32", 7),
              KvI32("neg", -5),
              KvU64("big", uint64_t{1} << 40),
              {"u8", Bytes().U32(0).U8(200).str()},
              {"i16", Bytes().U32(3).Raw("\xfe\xff", 2).str()},
              {"f64", Bytes().U32(12).Raw("\x00\x00\x00\x00\x00\x00\xf8\x3f", 8).str()},  // 1.5
              KvF32("f32", 0.25f),
              KvBool("flag", true),
              KvStr("s", "hello"),
              KvStrArr("sa", {"a", "", "c"}),
              KvF32Arr("fa", {1.5f, -2.0f}),
              {"nested", nested.str()},
              {"u16arr", u16arr.str()}};
  spec.alignment = 1;  // no trailing padding, so every strict prefix is invalid
  const std::string bytes = WriteGguf(spec);
  auto f = ParseString(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->version(), 3u);
  EXPECT_EQ((*f)->metadata().size(), spec.kvs.size());
  EXPECT_EQ(*(*f)->GetU32("u32"), 7u);
  EXPECT_EQ(*(*f)->GetI64("u32"), 7);
  EXPECT_EQ(*(*f)->GetI32("neg"), -5);
  EXPECT_FALSE((*f)->GetU32("neg").ok());  // negative into unsigned
  EXPECT_EQ(*(*f)->GetU64("big"), uint64_t{1} << 40);
  EXPECT_FALSE((*f)->GetU32("big").ok());  // out of range
  EXPECT_EQ(*(*f)->GetU32("u8"), 200u);
  EXPECT_EQ(*(*f)->GetI32("i16"), -2);
  EXPECT_EQ(*(*f)->GetF64("f64"), 1.5);
  EXPECT_EQ(*(*f)->GetF32("f32"), 0.25f);
  EXPECT_EQ(*(*f)->GetF32("u32"), 7.0f);  // integers coerce to float
  EXPECT_FALSE((*f)->GetU32("f32").ok());
  EXPECT_TRUE(*(*f)->GetBool("flag"));
  EXPECT_EQ(*(*f)->GetString("s"), "hello");
  EXPECT_FALSE((*f)->GetString("u32").ok());
  EXPECT_EQ((*f)->GetU32("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*(*f)->GetU32Or("missing", 9), 9u);
  EXPECT_FALSE((*f)->GetU32Or("s", 9).ok());  // present with the wrong type
  EXPECT_EQ(*(*f)->GetStringArray("sa"), (std::vector<std::string>{"a", "", "c"}));
  EXPECT_EQ(*(*f)->GetF32Array("fa"), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(*(*f)->GetI32Array("u16arr"), (std::vector<int32_t>{7, 8, 65535}));
  EXPECT_FALSE((*f)->GetStringArray("fa").ok());
  const GgufValue* n = (*f)->Find("nested");
  ASSERT_NE(n, nullptr);
  ASSERT_EQ(n->arrays.size(), 2u);
  EXPECT_EQ(n->arrays[0].count, 2u);
  EXPECT_EQ(n->arrays[1].elem_type, GgufType::kInt32);
  int32_t last = 0;
  std::memcpy(&last, n->arrays[1].raw.data(), 4);
  EXPECT_EQ(last, -3);
  EXPECT_EQ(n->ToString(), "[array x 2]");
  EXPECT_TRUE((*f)->tensors().empty());
  // Every strict prefix of the file is rejected.
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    EXPECT_FALSE(ParseString(bytes.substr(0, cut)).ok()) << cut;
  }
}

TEST(GgufTest, HeaderErrors) {
  std::string good = WriteGguf(TinyLlama());
  std::string bad = good;
  bad[0] = 'X';
  ExpectLoadFails(bad, "not a GGUF file");
  bad = good;
  bad[4] = 1;  // version 1
  ExpectLoadFails(bad, "version 1");
  bad = good;
  bad[4] = 4;
  ExpectLoadFails(bad, "version 4");
  GgufSpec spec = TinyLlama();
  spec.n_tensors_override = uint64_t{1} << 60;
  ExpectLoadFails(WriteGguf(spec), "tensor count");
  spec = TinyLlama();
  spec.n_kv_override = uint64_t{1} << 60;
  ExpectLoadFails(WriteGguf(spec), "metadata count");
  spec = TinyLlama();
  spec.n_kv_override = spec.kvs.size() + 1;  // runs into the tensor directory
  ExpectLoadFails(WriteGguf(spec));
  ExpectLoadFails("GG");
}

TEST(GgufTest, AbsurdSizesInsideMetadata) {
  GgufSpec spec = TinyLlama();
  spec.kvs.push_back({"huge.array", Bytes().U32(9).U32(4).U64(uint64_t{1} << 60).str()});
  ExpectLoadFails(WriteGguf(spec), "huge.array");
  spec = TinyLlama();
  spec.kvs.push_back({"huge.strings", Bytes().U32(9).U32(8).U64(uint64_t{1} << 61).str()});
  ExpectLoadFails(WriteGguf(spec), "huge.strings");
  spec = TinyLlama();
  spec.kvs.push_back({"huge.string", Bytes().U32(8).U64(~uint64_t{0}).str()});
  ExpectLoadFails(WriteGguf(spec), "huge.string");
  spec = TinyLlama();
  spec.kvs.push_back({"bad.type", Bytes().U32(13).U32(0).str()});
  ExpectLoadFails(WriteGguf(spec), "bad.type");
  spec = TinyLlama();
  Bytes deep;  // arrays nested 100 deep
  for (int i = 0; i < 100; ++i) deep.U32(9).U64(1);
  spec.kvs.push_back({"deep", Bytes().U32(9).Append(deep.str()).str()});
  ExpectLoadFails(WriteGguf(spec), "deep");
  spec = TinyLlama();
  spec.kvs.push_back(KvStr("general.name", "again"));
  ExpectLoadFails(WriteGguf(spec), "duplicate");
  spec = TinyLlama();
  spec.kvs.push_back(KvU32("general.alignment", 24));
  ExpectLoadFails(WriteGguf(spec), "general.alignment");
}

TEST(GgufTest, TensorErrors) {
  GgufSpec spec = TinyLlama();
  spec.tensors[3].offset = uint64_t{1} << 40;  // blk.0.attn_norm
  ExpectLoadFails(WriteGguf(spec), "blk.0.attn_norm.weight");
  spec = TinyLlama();
  spec.tensors.back().offset = ~uint64_t{0} - 31;  // overflows offset + size
  ExpectLoadFails(WriteGguf(spec), spec.tensors.back().name);
  spec = TinyLlama();
  spec.tensors[1].offset = 32 * 7 + 4;  // misaligned
  ExpectLoadFails(WriteGguf(spec), "alignment");
  spec = TinyLlama();
  spec.tensors[1].name = spec.tensors[0].name;
  ExpectLoadFails(WriteGguf(spec), "duplicate");
  spec = TinyLlama();
  spec.tensors[0].ne = {32, 3, 2};  // same bytes, wrong shape
  ExpectLoadFails(WriteGguf(spec), "token_embd.weight");
  spec = TinyLlama();
  spec.tensors[0].ne = {32, 1, 1, 1, 6};
  ExpectLoadFails(WriteGguf(spec), "dimensions");
  spec = TinyLlama();
  spec.tensors[0].ne = {uint64_t{1} << 40, uint64_t{1} << 40};
  ExpectLoadFails(WriteGguf(spec), "token_embd.weight");
  spec = TinyLlama();
  spec.tensors[4].ne = {32, 16};  // attn_q with kv_dim rows: shape mismatch vs config
  spec.tensors[4].data.resize(16 * 34);
  ExpectLoadFails(WriteGguf(spec), "blk.0.attn_q.weight");
  spec = TinyLlama();
  spec.tensors[0].type = 200;
  ExpectLoadFails(WriteGguf(spec), "token_embd.weight");
  spec = TinyLlama();
  spec.tensors[4].type = 20;  // iq4_nl: 32*32/32 blocks * 18 bytes
  spec.tensors[4].data.resize(32 * 18);
  {
    const std::string path = WriteTempFile("iq.gguf", WriteGguf(spec));
    TempCleanup cleanup{path};
    auto m = LoadGgufModel(path);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_TRUE(Contains(m.status(), path) && Contains(m.status(), "blk.0.attn_q.weight") &&
                Contains(m.status(), "iq4_nl"))
        << m.status();
  }
  spec = TinyLlama();
  spec.tensors.erase(spec.tensors.begin() + 5);  // blk.0.attn_k
  ExpectLoadFails(WriteGguf(spec), "blk.0.attn_k.weight");
  spec = TinyLlama();
  spec.kvs[0] = KvStr("general.architecture", "qwen2");
  {
    const std::string path = WriteTempFile("qwen.gguf", WriteGguf(spec));
    TempCleanup cleanup{path};
    auto m = LoadGgufModel(path);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_TRUE(Contains(m.status(), "qwen2") && Contains(m.status(), path)) << m.status();
  }
  spec = TinyLlama();
  spec.kvs[5] = KvU32("llama.attention.head_count", 0);
  ExpectLoadFails(WriteGguf(spec), "n_heads");
  EXPECT_EQ(LoadGgufModel("/nonexistent/x.gguf").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufTest, TruncatedSyntheticModelAtEveryCut) {
  const std::string good = WriteGguf(TinyLlama());
  ASSERT_TRUE(ParseString(good).ok());
  const auto* data = reinterpret_cast<const uint8_t*>(good.data());
  const size_t header_end = (*ParseString(good))->data_offset();
  // In memory: every cut inside the header and tensor directory, then every
  // 61st byte of the tensor data (those all fail the same range check), and the last byte.
  std::vector<size_t> cuts;
  for (size_t cut = 0; cut < good.size(); cut += cut < header_end ? 1 : 61) cuts.push_back(cut);
  cuts.push_back(good.size() - 1);
  for (size_t cut : cuts) {
    auto f = GgufFile::Parse(data, cut, "cut.gguf");
    ASSERT_FALSE(f.ok()) << cut;
    EXPECT_TRUE(Contains(f.status(), "cut.gguf")) << f.status();
  }
  // Through files and the model loader: 120 cut points spread over the file.
  for (int i = 0; i < 120; ++i) {
    const size_t cut = good.size() * i / 120;
    ExpectLoadFails(good.substr(0, cut == 0 ? 1 : cut));
  }
}

TEST(GgufTest, TruncatedSmolLM2Header) {
  auto path = SmolLM2Gguf();
  if (!path) GTEST_SKIP() << "SmolLM2 GGUF not present";
  auto full = MappedFile::Open(*path);
  ASSERT_TRUE(full.ok());
  auto parsed = GgufFile::Parse((*full)->data(), (*full)->size(), *path);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const size_t header_end = (*parsed)->data_offset();
  EXPECT_EQ((*parsed)->tensors().size(), 272u);
  // In memory, 100 cuts across the header/metadata/tensor directory, plus near the end.
  for (int i = 0; i < 100; ++i) {
    const size_t cut = header_end * i / 100 + (i % 7);
    auto f = GgufFile::Parse((*full)->data(), cut, *path);
    ASSERT_FALSE(f.ok()) << cut;
    EXPECT_TRUE(Contains(f.status(), *path)) << f.status();
  }
  EXPECT_FALSE(GgufFile::Parse((*full)->data(), (*full)->size() - 1, *path).ok());
  // A few real truncated copies through the model loader.
  const std::string bytes((*full)->view().substr(0, header_end + 2000));
  for (size_t cut : {size_t{3}, size_t{24}, size_t{1000}, size_t{700000}, header_end - 5, header_end + 1000}) {
    ExpectLoadFails(bytes.substr(0, cut));
  }
}

}  // namespace
}  // namespace nibble::io
