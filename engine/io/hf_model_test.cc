// HF checkpoints: scripts/export_hf.py output for stories260K checked against
// the llama2.c file's own floats, safetensors validation, tokenizer.json
// parsing, and malformed inputs.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/io/hf_model.h"
#include "engine/io/hf_tokenizer.h"
#include "engine/model/llama_model.h"
#include "engine/io/safetensors.h"
#include "gtest/gtest.h"
#include "kernels/common/fp16.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace nibble::io {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;
using ::nibble::testing::MakeTempDir;
using ::nibble::testing::SourceDir;
using ::nibble::testing::Stories260KModel;

bool Contains(const absl::Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteAll(const std::string& path, const std::string& s) { std::ofstream(path, std::ios::binary) << s; }

// The llama2.c checkpoint read directly: header and fp32 arrays at their offsets.
struct Llama2c {
  int dim, hidden, layers, heads, kv_heads, vocab, seq;
  std::vector<float> f;  // whole file as floats (header included)
  size_t emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final;
  int hd() const { return dim / heads; }
  int kv_dim() const { return hd() * kv_heads; }
};

Llama2c ReadLlama2c(const std::string& path) {
  Llama2c m;
  const std::string s = ReadAll(path);
  int32_t h[7];
  std::memcpy(h, s.data(), 28);
  m.dim = h[0], m.hidden = h[1], m.layers = h[2], m.heads = h[3], m.kv_heads = h[4], m.vocab = std::abs(h[5]),
  m.seq = h[6];
  m.f.resize(s.size() / 4);
  std::memcpy(m.f.data(), s.data(), m.f.size() * 4);
  size_t p = 7;
  auto take = [&](size_t n) {
    size_t at = p;
    p += n;
    return at;
  };
  const size_t L = m.layers, D = m.dim, KV = m.kv_dim(), H = m.hidden;
  m.emb = take(m.vocab * D);
  m.rms_att = take(L * D);
  m.wq = take(L * D * D);
  m.wk = take(L * KV * D);
  m.wv = take(L * KV * D);
  m.wo = take(L * D * D);
  m.rms_ffn = take(L * D);
  m.w1 = take(L * H * D);
  m.w2 = take(L * D * H);
  m.w3 = take(L * H * D);
  m.rms_final = take(D);
  return m;
}

class HfExportTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::system("python3 -c 'import numpy' >/dev/null 2>&1") != 0) {
      skip_ = "python3 with numpy is not available";
      return;
    }
    if (!fs::exists(Stories260KModel())) {
      skip_ = "stories260K.bin not present";
      return;
    }
    root_ = MakeTempDir("nibble_hf_");
    for (const auto& [dir, flags] : {std::pair{"f32", "--dtype f32"}, std::pair{"bf16", "--dtype bf16"},
                                     std::pair{"sharded", "--dtype f32 --shards 3"}}) {
      const std::string cmd = "python3 " + SourceDir() + "/scripts/export_hf.py " + Stories260KModel() + " " +
                              root_ + "/" + dir + " " + flags;
      ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    }
  }
  static void TearDownTestSuite() {
    if (!root_.empty()) fs::remove_all(root_);
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
  }
  // A fresh copy of an exported directory to corrupt.
  static std::string Copy(const std::string& variant) {
    const std::string dst = MakeTempDir("nibble_hfbad_");
    fs::copy(root_ + "/" + variant, dst, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    return dst;
  }

  static inline std::string root_, skip_;
};

void ExpectSameAsLlama2c(const LoadedModel& m, const Llama2c& ref, bool bf16) {
  auto check = [&](const HostTensor& t, size_t offset, size_t n, const std::string& what) {
    ASSERT_EQ(t.data.size(), n) << what;
    for (size_t i = 0; i < n; ++i) {
      const float want = ref.f[offset + i];
      if (bf16) {
        ASSERT_LE(std::fabs(t.data[i] - want), std::fabs(want) * (1.0f / 256)) << what << "[" << i << "]";
        ASSERT_EQ(t.data[i], Bf16ToFp32(Fp32ToBf16(want))) << what << "[" << i << "]";
      } else {
        ASSERT_EQ(t.data[i], want) << what << "[" << i << "]";
      }
    }
  };
  const size_t D = ref.dim, H = ref.hidden, KV = ref.kv_dim();
  check(m.weights.tok_embeddings, ref.emb, ref.vocab * D, "embed_tokens");
  check(m.weights.final_norm, ref.rms_final, D, "norm");
  for (int l = 0; l < ref.layers; ++l) {
    const LayerWeights& w = m.weights.layers[l];
    check(w.attn_norm, ref.rms_att + l * D, D, "input_layernorm");
    check(w.ffn_norm, ref.rms_ffn + l * D, D, "post_attention_layernorm");
    check(w.wv, ref.wv + l * KV * D, KV * D, "v_proj");
    check(w.wo, ref.wo + l * D * D, D * D, "o_proj");
    check(w.w_gate, ref.w1 + l * H * D, H * D, "gate_proj = w1");
    check(w.w_up, ref.w3 + l * H * D, H * D, "up_proj = w3");
    check(w.w_down, ref.w2 + l * D * H, D * H, "down_proj = w2");
    // q/k: HF row h*hd + j*hd/2 + i holds llama2.c row h*hd + 2i + j.
    const int hd = ref.hd();
    for (auto [t, base, n_heads] : {std::tuple{&w.wq, ref.wq + l * D * D, ref.heads},
                                    std::tuple{&w.wk, ref.wk + l * KV * D, ref.kv_heads}}) {
      ASSERT_EQ(t->data.size(), static_cast<size_t>(n_heads) * hd * D);
      for (int h = 0; h < n_heads; ++h) {
        for (int i = 0; i < hd / 2; ++i) {
          for (int j = 0; j < 2; ++j) {
            const float* got = t->data.data() + (h * hd + j * hd / 2 + i) * D;
            const float* want = ref.f.data() + base + (h * hd + 2 * i + j) * D;
            for (size_t c = 0; c < D; ++c) {
              ASSERT_EQ(got[c], bf16 ? Bf16ToFp32(Fp32ToBf16(want[c])) : want[c])
                  << "layer " << l << " head " << h << " pair " << i << "," << j;
            }
          }
        }
      }
    }
  }
}

TEST_F(HfExportTest, F32MatchesLlama2cFile) {
  const Llama2c ref = ReadLlama2c(Stories260KModel());
  auto m = LoadHfModel(root_ + "/f32");
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = m->config;
  EXPECT_EQ(c.dim, ref.dim);
  EXPECT_EQ(c.hidden_dim, ref.hidden);
  EXPECT_EQ(c.n_layers, ref.layers);
  EXPECT_EQ(c.n_heads, ref.heads);
  EXPECT_EQ(c.n_kv_heads, ref.kv_heads);
  EXPECT_EQ(c.vocab_size, ref.vocab);
  EXPECT_EQ(c.max_seq_len, ref.seq);
  EXPECT_EQ(c.head_dim, ref.hd());
  EXPECT_EQ(c.rope_dim, ref.hd());
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  EXPECT_EQ(c.tied_embeddings, true);
  EXPECT_EQ(c.rope_style, RopeStyle::kHalf);
  EXPECT_EQ(m->source_format, "hf");
  EXPECT_EQ(m->vocab.kind, TokenizerKind::kNone);  // llama2.c keeps its tokenizer elsewhere
  EXPECT_EQ(m->metadata.at("model_type"), "llama");
  ExpectSameAsLlama2c(*m, ref, /*bf16=*/false);
  // A file inside the directory works too.
  auto again = LoadHfModel(root_ + "/f32/config.json");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->weights.layers[3].w_up.data, m->weights.layers[3].w_up.data);
}

TEST_F(HfExportTest, Bf16WithinRounding) {
  auto m = LoadHfModel(root_ + "/bf16/model.safetensors");
  ASSERT_TRUE(m.ok()) << m.status();
  ExpectSameAsLlama2c(*m, ReadLlama2c(Stories260KModel()), /*bf16=*/true);
}

// keep_16bit: BF16 matrices stay bfloat16 (HostTensor::bf16) and widen to
// exactly what the fp32 load gives; norms stay fp32.
TEST_F(HfExportTest, Bf16KeptAt16BitsWidensToTheFp32Load) {
  auto kept = LoadHfModel(root_ + "/bf16/model.safetensors", /*keep_16bit=*/true);
  auto wide = LoadHfModel(root_ + "/bf16/model.safetensors");
  ASSERT_TRUE(kept.ok()) << kept.status();
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_TRUE(kept->weights.Validate(kept->config, "bf16").ok());
  EXPECT_FALSE(kept->weights.layers[0].attn_norm.is_bf16());
  for (size_t l = 0; l < kept->weights.layers.size(); ++l) {
    LayerWeights& k = kept->weights.layers[l];
    const LayerWeights& w = wide->weights.layers[l];
    for (auto [a, b] : {std::pair{&k.wq, &w.wq}, {&k.wk, &w.wk}, {&k.w_down, &w.w_down}}) {
      ASSERT_TRUE(a->is_bf16()) << a->name;
      EXPECT_TRUE(a->data.empty());
      HostTensor copy = *a;
      copy.WidenHalf();
      EXPECT_FALSE(copy.is_bf16());
      EXPECT_EQ(copy.data, b->data) << a->name;
    }
  }
  ASSERT_TRUE(kept->weights.tok_embeddings.is_bf16());

  // The engine on the kept bf16 matrices (cpu::MatMulBF16) gives the widened
  // model's logits bit for bit: prefill (packed GEMM) and decode (GEMV).
  std::vector<float> logits[2];
  int idx = 0;
  for (LoadedModel* m : {&*kept, &*wide}) {
    m->vocab.kind = TokenizerKind::kNone;  // not needed for Forward
    auto model = LlamaModel::Create(*m, 2);
    ASSERT_TRUE(model.ok()) << model.status();
    const int V = (*model)->config().vocab_size;
    std::vector<int32_t> prompt;
    for (int i = 0; i < 23; ++i) prompt.push_back((i * 37 + 11) % V);
    auto kv = (*model)->NewKVCache(32);
    logits[idx].resize(size_t(25) * V);
    ASSERT_TRUE((*model)->Forward(prompt, 0, kv.get(), {logits[idx].data(), size_t(23) * V}, true).ok());
    for (int s = 0; s < 2; ++s) {
      const int32_t tok = 5 + s;
      ASSERT_TRUE((*model)->Forward({&tok, 1}, 23 + s, kv.get(), {logits[idx].data() + size_t(23 + s) * V, size_t(V)}).ok());
    }
    ++idx;
  }
  ASSERT_EQ(logits[0].size(), logits[1].size());
  EXPECT_EQ(std::memcmp(logits[0].data(), logits[1].data(), logits[0].size() * sizeof(float)), 0);
}

TEST_F(HfExportTest, ThreeShards) {
  ASSERT_TRUE(fs::exists(root_ + "/sharded/model-00003-of-00003.safetensors"));
  ASSERT_TRUE(fs::exists(root_ + "/sharded/model.safetensors.index.json"));
  auto m = LoadHfModel(root_ + "/sharded");
  ASSERT_TRUE(m.ok()) << m.status();
  ExpectSameAsLlama2c(*m, ReadLlama2c(Stories260KModel()), /*bf16=*/false);
}

// Rewrites the safetensors header of `file` through `edit`, keeping the data.
void EditHeader(const std::string& file, const std::function<void(json&)>& edit) {
  const std::string s = ReadAll(file);
  uint64_t n = 0;
  std::memcpy(&n, s.data(), 8);
  json h = json::parse(s.substr(8, n));
  edit(h);
  const std::string hs = h.dump();
  const uint64_t hn = hs.size();
  WriteAll(file, std::string(reinterpret_cast<const char*>(&hn), 8) + hs + s.substr(8 + n));
}

void ExpectFails(const std::string& dir, const std::string& mention, const std::string& mention2 = "") {
  auto m = LoadHfModel(dir);
  ASSERT_FALSE(m.ok()) << "expected failure mentioning " << mention;
  EXPECT_TRUE(Contains(m.status(), mention)) << m.status();
  if (!mention2.empty()) {
    EXPECT_TRUE(Contains(m.status(), mention2)) << m.status();
  }
  fs::remove_all(dir);
}

TEST_F(HfExportTest, MalformedCheckpoints) {
  std::string d = Copy("f32");
  std::string st = d + "/model.safetensors";
  {
    std::string s = ReadAll(st);
    const uint64_t huge = uint64_t{1} << 50;
    std::memcpy(s.data(), &huge, 8);
    WriteAll(st, s);
  }
  ExpectFails(d, st, "header length");

  d = Copy("f32");
  st = d + "/model.safetensors";
  WriteAll(st, ReadAll(st).substr(0, 1000000));  // truncated: data_offsets past EOF
  ExpectFails(d, st, "outside");

  d = Copy("f32");
  st = d + "/model.safetensors";
  EditHeader(st, [](json& h) { h["model.norm.weight"]["dtype"] = "I32"; });
  ExpectFails(d, st, "I32");

  d = Copy("f32");
  st = d + "/model.safetensors";
  EditHeader(st, [](json& h) { h["model.layers.2.mlp.up_proj.weight"]["dtype"] = "Q4"; });
  ExpectFails(d, st, "Q4");

  d = Copy("f32");
  st = d + "/model.safetensors";
  EditHeader(st, [](json& h) { h.erase("model.layers.2.mlp.up_proj.weight"); });
  ExpectFails(d, st, "model.layers.2.mlp.up_proj.weight");

  d = Copy("f32");
  st = d + "/model.safetensors";
  {
    std::string s = ReadAll(st);
    s[8] = '[';  // breaks the JSON
    WriteAll(st, s);
  }
  ExpectFails(d, st, "JSON");

  d = Copy("f32");
  fs::remove(d + "/config.json");
  ExpectFails(d, d + "/config.json");

  d = Copy("f32");
  WriteAll(d + "/config.json", "{\"model_type\": \"llama\", ");
  ExpectFails(d, d + "/config.json", "JSON");

  d = Copy("f32");
  {
    json c = json::parse(ReadAll(d + "/config.json"));
    c["model_type"] = "gpt2";
    WriteAll(d + "/config.json", c.dump());
  }
  ExpectFails(d, "gpt2", d + "/config.json");

  d = Copy("f32");
  {
    json c = json::parse(ReadAll(d + "/config.json"));
    c["intermediate_size"] = 128;  // tensors no longer match
    WriteAll(d + "/config.json", c.dump());
  }
  ExpectFails(d, "gate_proj", d + "/model.safetensors");

  d = Copy("f32");
  {
    json c = json::parse(ReadAll(d + "/config.json"));
    c["tie_word_embeddings"] = false;  // then lm_head.weight is required
    WriteAll(d + "/config.json", c.dump());
  }
  ExpectFails(d, "lm_head.weight", d + "/model.safetensors");

  d = Copy("f32");
  fs::remove(d + "/model.safetensors");
  ExpectFails(d, "model.safetensors", d);

  d = Copy("sharded");
  fs::remove(d + "/model-00002-of-00003.safetensors");
  ExpectFails(d, d + "/model-00002-of-00003.safetensors");

  d = Copy("sharded");
  {
    json idx = json::parse(ReadAll(d + "/model.safetensors.index.json"));
    idx["weight_map"].erase("model.layers.4.self_attn.k_proj.weight");
    WriteAll(d + "/model.safetensors.index.json", idx.dump());
  }
  ExpectFails(d, "model.layers.4.self_attn.k_proj.weight", "model.safetensors.index.json");

  d = Copy("sharded");
  {
    json idx = json::parse(ReadAll(d + "/model.safetensors.index.json"));
    idx["weight_map"]["model.norm.weight"] = "../../etc/passwd";
    WriteAll(d + "/model.safetensors.index.json", idx.dump());
  }
  ExpectFails(d, "model.safetensors.index.json");

  EXPECT_EQ(LoadHfModel("/nonexistent/dir").status().code(), absl::StatusCode::kNotFound);
}

// --- SafetensorsFile on hand-built images ---

std::string Image(const std::string& header, const std::string& data) {
  const uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + data;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> ParseImage(const std::string& s) {
  return SafetensorsFile::Parse(reinterpret_cast<const uint8_t*>(s.data()), s.size(), "img.safetensors");
}

TEST(SafetensorsTest, ParsesAndConverts) {
  float f[2] = {1.5f, -2.25f};
  uint16_t h[2] = {Fp32ToFp16(0.5f), Fp32ToFp16(-3.0f)};
  uint16_t b[2] = {Fp32ToBf16(7.0f), Fp32ToBf16(-0.125f)};
  std::string data(reinterpret_cast<char*>(f), 8);
  data += std::string(reinterpret_cast<char*>(h), 4) + std::string(reinterpret_cast<char*>(b), 4);
  const std::string img = Image(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},)"
      R"("c":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]},"__metadata__":{"format":"pt"}}   )",
      data);
  auto st = ParseImage(img);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ((*st)->tensors().size(), 3u);
  EXPECT_EQ((*st)->metadata().at("format"), "pt");
  std::vector<float> out;
  ASSERT_TRUE((*st)->ReadF32(*(*st)->Find("a"), &out).ok());
  EXPECT_EQ(out, (std::vector<float>{1.5f, -2.25f}));
  ASSERT_TRUE((*st)->ReadF32(*(*st)->Find("b"), &out).ok());
  EXPECT_EQ(out, (std::vector<float>{0.5f, -3.0f}));
  EXPECT_EQ((*st)->Find("b")->shape, (std::vector<int64_t>{1, 2}));
  ASSERT_TRUE((*st)->ReadF32(*(*st)->Find("c"), &out).ok());
  EXPECT_EQ(out, (std::vector<float>{7.0f, -0.125f}));
  EXPECT_EQ((*st)->Find("zz"), nullptr);
  // Every strict prefix fails.
  for (size_t cut = 0; cut < img.size(); ++cut) {
    EXPECT_FALSE(SafetensorsFile::Parse(reinterpret_cast<const uint8_t*>(img.data()), cut, "x").ok()) << cut;
  }
}

TEST(SafetensorsTest, RejectsMalformedHeaders) {
  const std::string d8(8, '\0');
  struct Case {
    std::string header, data, mention;
  } cases[] = {
      {"[]", d8, "not a JSON object"},
      {"{\"a\":", d8, "JSON"},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8, "need"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", d8, "outside"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8, "outside"},
      {R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8, "shape"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", d8, "data_offsets"},
      {R"({"a":{"dtype":"X9","shape":[2],"data_offsets":[0,8]}})", d8, "X9"},
      {R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d8, "dtype"},
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", d8, "shape"},
      {R"({"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
       d8, "overlap"},
      {R"({"a":7})", d8, "not an object"},
  };
  for (const Case& c : cases) {
    auto st = ParseImage(Image(c.header, c.data));
    ASSERT_FALSE(st.ok()) << c.header;
    EXPECT_TRUE(Contains(st.status(), "img.safetensors") && Contains(st.status(), c.mention))
        << c.header << " -> " << st.status();
  }
  EXPECT_FALSE(ParseImage("1234").ok());
  const uint64_t too_long = 1000;
  EXPECT_TRUE(Contains(ParseImage(std::string(reinterpret_cast<const char*>(&too_long), 8) + "{}").status(),
                       "header length"));
  // A valid file with a non-float dtype refuses conversion.
  auto st = ParseImage(Image(R"({"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})", d8));
  ASSERT_TRUE(st.ok()) << st.status();
  std::vector<float> out;
  EXPECT_TRUE(Contains((*st)->ReadF32((*st)->tensors()[0], &out), "I32"));
}

// --- tokenizer.json ---

TEST(HfTokenizerTest, ByteLevelBpe) {
  const std::string dir = MakeTempDir("nibble_hftok_");
  json tok = {
      {"added_tokens",
       json::array({{{"id", 0}, {"content", "<|endoftext|>"}, {"special", true}},
                    {{"id", 1}, {"content", "<|im_start|>"}, {"special", true}},
                    {{"id", 2}, {"content", "<|im_end|>"}, {"special", true}},
                    {{"id", 7}, {"content", "<tool>"}, {"special", false}}})},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers", json::array({{{"type", "Digits"}, {"individual_digits", true}},
                                       {{"type", "ByteLevel"}, {"add_prefix_space", false}}})}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"},
        {"vocab", {{"<|endoftext|>", 0}, {"<|im_start|>", 1}, {"<|im_end|>", 2}, {"h", 3}, {"i", 4}, {"hi", 5}}},
        {"merges", json::array({"h i", json::array({"hi", "i"})})}}}};
  WriteAll(dir + "/tokenizer.json", tok.dump());
  WriteAll(dir + "/tokenizer_config.json",
           R"({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": false,
               "chat_template": "{{ bos_token }}"})");
  VocabSpec v;
  std::string tmpl;
  ASSERT_TRUE(ReadHfTokenizer(dir, R"({"eos_token_id": [2, 0]})", &v, &tmpl).ok());
  EXPECT_EQ(v.kind, TokenizerKind::kGpt2Bpe);
  EXPECT_EQ(v.pre, "smollm");
  ASSERT_EQ(v.tokens.size(), 8u);
  EXPECT_EQ(v.tokens[5], "hi");
  EXPECT_EQ(v.tokens[6], "[PAD6]");  // hole in the ids
  EXPECT_EQ(v.token_types[0], TokenType::kControl);
  EXPECT_EQ(v.token_types[7], TokenType::kUserDefined);
  EXPECT_EQ(v.token_types[3], TokenType::kNormal);
  EXPECT_EQ(v.merges, (std::vector<std::string>{"h i", "hi i"}));
  EXPECT_EQ(v.bos_id, 1);
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_FALSE(v.add_bos);
  EXPECT_FALSE(v.add_space_prefix);
  EXPECT_EQ(v.eog_ids, (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(tmpl, "{{ bos_token }}");

  // Plain ByteLevel -> "gpt2"; ids from config.json when tokenizer_config.json is absent.
  fs::remove(dir + "/tokenizer_config.json");
  tok["pre_tokenizer"] = {{"type", "ByteLevel"}};
  WriteAll(dir + "/tokenizer.json", tok.dump());
  ASSERT_TRUE(ReadHfTokenizer(dir, R"({"bos_token_id": 0, "eos_token_id": 0})", &v, &tmpl).ok());
  EXPECT_EQ(v.pre, "gpt2");
  EXPECT_EQ(v.bos_id, 0);
  EXPECT_EQ(tmpl, "");

  // Not byte-level (SentencePiece-style BPE): no tokenizer, no error.
  tok["pre_tokenizer"] = {{"type", "Metaspace"}};
  tok["decoder"] = {{"type", "Metaspace"}};
  WriteAll(dir + "/tokenizer.json", tok.dump());
  ASSERT_TRUE(ReadHfTokenizer(dir, "", &v, &tmpl).ok());
  EXPECT_EQ(v.kind, TokenizerKind::kNone);

  // Malformed JSON names the file.
  WriteAll(dir + "/tokenizer.json", "{\"model\": ");
  absl::Status s = ReadHfTokenizer(dir, "", &v, &tmpl);
  EXPECT_TRUE(Contains(s, dir + "/tokenizer.json")) << s;

  // tokenizer.model wins.
  WriteAll(dir + "/tokenizer.model", "x");
  ASSERT_TRUE(ReadHfTokenizer(dir, R"({"bos_token_id": 1, "eos_token_id": 2})", &v, &tmpl).ok());
  EXPECT_EQ(v.kind, TokenizerKind::kSentencePieceModel);
  EXPECT_EQ(v.sp_model_path, dir + "/tokenizer.model");
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_TRUE(v.add_bos);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace nibble::io
