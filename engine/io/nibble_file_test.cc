// nibble model file: CRC32C against published check values, bit-exact round
// trips of real models (stories260K through the llama2.c reader, SmolLM2
// through the GGUF reader) and of hand-made quantized tensors, identical
// logits after a round trip, and corrupt/truncated/inconsistent files, which
// must fail with an error naming the file (and the tensor/field).
//
// Corrupt variants are produced by editing the JSON directory and data section
// with this file's own header code, written from docs/FORMAT.md.
#include "engine/io/nibble_file.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>

#include "engine/core/quant_tensor.h"
#include "engine/io/nibble_file_internal.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/common/fp16.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace nibble::io {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }
bool Contains(const absl::Status& s, const std::string& text) { return Msg(s).find(text) != std::string::npos; }

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ------------------------------------------------------------------ CRC32C --

TEST(Crc32cTest, PublishedCheckValues) {
  // The CRC catalogue check value and RFC 3720 appendix B.4.
  const std::string digits = "123456789";
  std::string zeros(32, '\0'), ones(32, '\xff'), up(32, '\0'), down(32, '\0');
  for (int i = 0; i < 32; ++i) up[i] = static_cast<char>(i), down[i] = static_cast<char>(31 - i);
  for (auto* f : {&Crc32c, &Crc32cPortable}) {
    EXPECT_EQ(f(digits.data(), digits.size(), 0), 0xE3069283u);
    EXPECT_EQ(f(zeros.data(), 32, 0), 0x8A9136AAu);
    EXPECT_EQ(f(ones.data(), 32, 0), 0x62A8AB43u);
    EXPECT_EQ(f(up.data(), 32, 0), 0x46DD794Eu);
    EXPECT_EQ(f(down.data(), 32, 0), 0x113FDB5Cu);
    EXPECT_EQ(f(nullptr, 0, 0), 0u);
  }
}

TEST(Crc32cTest, HardwareMatchesPortableAndExtends) {
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(4096 + 16);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t start : {0, 1, 3, 7, 8}) {
    for (size_t n : {0, 1, 7, 8, 9, 63, 64, 65, 1000, 4096}) {
      const uint32_t a = Crc32c(buf.data() + start, n), b = Crc32cPortable(buf.data() + start, n);
      ASSERT_EQ(a, b) << start << " " << n;
      const size_t cut = n / 3;
      EXPECT_EQ(Crc32c(buf.data() + start + cut, n - cut, Crc32c(buf.data() + start, cut)), a);
    }
  }
}

TEST(NibbleInternalTest, Utf8Validation) {
  EXPECT_EQ(nbl::Utf8Problem("plain \xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x98\x80"), "");
  for (const char* bad : {"\xff", "\xc3", "\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80", "a\x80"}) {
    EXPECT_NE(nbl::Utf8Problem(bad), "") << bad;
  }
}

// ---------------------------------------------------------------- helpers --

// Every tensor slot, listed independently of the file code.
std::vector<std::pair<std::string, const HostTensor*>> Slots(const ModelWeights& w) {
  std::vector<std::pair<std::string, const HostTensor*>> v{
      {"tok_embeddings", &w.tok_embeddings}, {"final_norm", &w.final_norm}, {"output", &w.output}};
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string p = "layers." + std::to_string(i) + ".";
    for (auto [n, t] : {std::pair{"attn_norm", &l.attn_norm}, std::pair{"wq", &l.wq}, std::pair{"wk", &l.wk},
                        std::pair{"wv", &l.wv}, std::pair{"wo", &l.wo}, std::pair{"ffn_norm", &l.ffn_norm},
                        std::pair{"w_gate", &l.w_gate}, std::pair{"w_up", &l.w_up}, std::pair{"w_down", &l.w_down}}) {
      v.emplace_back(p + n, t);
    }
  }
  return v;
}

template <typename T>
bool SameBytes(std::span<const T> a, std::span<const T> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size_bytes()) == 0);
}

void ExpectSameQuant(const QuantTensor& a, const QuantTensor& b, const std::string& n) {
  EXPECT_EQ(a.rows, b.rows) << n;
  EXPECT_EQ(a.cols, b.cols) << n;
  ASSERT_EQ(a.segments.size(), b.segments.size()) << n;
  for (size_t i = 0; i < a.segments.size(); ++i) {
    EXPECT_EQ(a.segments[i].row_begin, b.segments[i].row_begin) << n;
    EXPECT_EQ(a.segments[i].row_end, b.segments[i].row_end) << n;
    EXPECT_TRUE(a.segments[i].format == b.segments[i].format) << n;
    EXPECT_TRUE(SameBytes(a.segments[i].data, b.segments[i].data)) << n << " segment " << i;
  }
  const Sidecar &x = a.sidecar, &y = b.sidecar;
  EXPECT_EQ(x.type, y.type) << n;
  EXPECT_TRUE(SameBytes(x.row_ptr, y.row_ptr)) << n;
  EXPECT_TRUE(SameBytes(x.col, y.col)) << n;
  EXPECT_TRUE(SameBytes(x.f16, y.f16)) << n;
  EXPECT_TRUE(SameBytes(x.i8, y.i8)) << n;
  EXPECT_TRUE(SameBytes(x.row_scale, y.row_scale)) << n;
}

void ExpectSameModel(const LoadedModel& a, const LoadedModel& b) {
  const ModelConfig &c = a.config, &d = b.config;
  EXPECT_EQ(c.architecture, d.architecture);
  EXPECT_EQ(c.dim, d.dim);
  EXPECT_EQ(c.hidden_dim, d.hidden_dim);
  EXPECT_EQ(c.n_layers, d.n_layers);
  EXPECT_EQ(c.n_heads, d.n_heads);
  EXPECT_EQ(c.n_kv_heads, d.n_kv_heads);
  EXPECT_EQ(c.head_dim, d.head_dim);
  EXPECT_EQ(c.vocab_size, d.vocab_size);
  EXPECT_EQ(c.max_seq_len, d.max_seq_len);
  EXPECT_EQ(FloatToBits(c.norm_eps), FloatToBits(d.norm_eps));
  EXPECT_EQ(FloatToBits(c.rope_theta), FloatToBits(d.rope_theta));
  EXPECT_EQ(c.rope_dim, d.rope_dim);
  EXPECT_EQ(c.rope_style, d.rope_style);
  EXPECT_EQ(c.tied_embeddings, d.tied_embeddings);

  const VocabSpec &v = a.vocab, &u = b.vocab;
  EXPECT_EQ(v.kind, u.kind);
  EXPECT_EQ(v.tokens, u.tokens);
  EXPECT_TRUE(SameBytes(std::span<const float>(v.scores), std::span<const float>(u.scores)));
  EXPECT_EQ(v.token_types, u.token_types);
  EXPECT_EQ(v.merges, u.merges);
  EXPECT_EQ(v.pre, u.pre);
  EXPECT_EQ(v.sp_model_path, u.sp_model_path);
  EXPECT_EQ(v.bos_id, u.bos_id);
  EXPECT_EQ(v.eos_id, u.eos_id);
  EXPECT_EQ(v.unk_id, u.unk_id);
  EXPECT_EQ(v.pad_id, u.pad_id);
  EXPECT_EQ(v.eog_ids, u.eog_ids);
  EXPECT_EQ(v.add_bos, u.add_bos);
  EXPECT_EQ(v.add_eos, u.add_eos);
  EXPECT_EQ(v.add_space_prefix, u.add_space_prefix);
  EXPECT_EQ(v.strip_space_after_bos, u.strip_space_after_bos);
  EXPECT_EQ(v.max_token_len, u.max_token_len);

  EXPECT_EQ(a.chat_template, b.chat_template);
  EXPECT_EQ(a.metadata, b.metadata);
  ASSERT_EQ(a.weights.layers.size(), b.weights.layers.size());
  const auto sa = Slots(a.weights), sb = Slots(b.weights);
  for (size_t i = 0; i < sa.size(); ++i) {
    const HostTensor &x = *sa[i].second, &y = *sb[i].second;
    const std::string& n = sa[i].first;
    EXPECT_EQ(x.name, y.name) << n;
    EXPECT_EQ(x.shape, y.shape) << n;
    EXPECT_TRUE(SameBytes(std::span<const float>(x.data), std::span<const float>(y.data))) << n;
    ASSERT_EQ(x.quant == nullptr, y.quant == nullptr) << n;
    if (x.quant) ExpectSameQuant(*x.quant, *y.quant, n);
  }
}

LoadedModel LoadStories() {
  LoadOptions opts;
  opts.tokenizer_path = testing::Stories260KTokenizer();
  auto m = LoadModel(testing::Stories260KModel(), opts);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return {};
  m->chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}";
  m->metadata["quant.method"] = "none";
  m->metadata["source.sha256"] = "0123456789abcdef";
  m->metadata["unicode"] = "h\xc3\xa9llo \xe2\x9c\x93";
  return *std::move(m);
}

// Hand-made quantized [rows, 64] matrix: rows [0, 40) int4_g64, the rest
// int2_g32_sym, a side-car of `type` with a few entries per row. The reader
// does not interpret codes, so the bytes are random.
std::shared_ptr<const QuantTensor> MakeQuant(int64_t rows, int64_t cols, Sidecar::ValueType type, uint32_t seed) {
  struct Owned {
    std::vector<uint8_t> seg0, seg1;
    std::vector<uint32_t> row_ptr;
    std::vector<uint16_t> col, f16, scale;
    std::vector<int8_t> i8;
  };
  auto o = std::make_shared<Owned>();
  std::mt19937 rng(seed);
  const auto f0 = fmt::Format::Parse("int4_g64"), f1 = fmt::Format::Parse("int2_g32_sym");
  EXPECT_TRUE(f0 && f1);
  // format.h: asym int: fp16 d, m + bits*group/8 code bytes per group; sym: fp16 d + codes.
  EXPECT_EQ(f0->RowBytes(64), 2 + 2 + 32);
  EXPECT_EQ(f1->RowBytes(64), 2 * (2 + 8));
  o->seg0.resize(40 * f0->RowBytes(cols));
  o->seg1.resize((rows - 40) * f1->RowBytes(cols));
  for (auto& b : o->seg0) b = static_cast<uint8_t>(rng());
  for (auto& b : o->seg1) b = static_cast<uint8_t>(rng());
  o->row_ptr.push_back(0);
  for (int64_t r = 0; r < rows; ++r) {
    const int n = static_cast<int>(rng() % 4);
    for (int k = 0; k < n; ++k) {
      o->col.push_back(static_cast<uint16_t>(rng() % cols));
      o->f16.push_back(Fp32ToFp16(static_cast<float>(rng() % 1000) / 100.0f));
      o->i8.push_back(static_cast<int8_t>(rng()));
    }
    o->row_ptr.push_back(static_cast<uint32_t>(o->col.size()));
    o->scale.push_back(Fp32ToFp16(0.01f * static_cast<float>(r + 1)));
  }
  auto q = std::make_shared<QuantTensor>();
  q->rows = rows;
  q->cols = cols;
  q->segments = {QuantSegment{0, 40, *f0, o->seg0}, QuantSegment{40, rows, *f1, o->seg1}};
  q->sidecar.type = type;
  if (type != Sidecar::ValueType::kNone) {
    q->sidecar.row_ptr = o->row_ptr;
    q->sidecar.col = o->col;
    if (type == Sidecar::ValueType::kF16) {
      q->sidecar.f16 = o->f16;
    } else {
      q->sidecar.i8 = o->i8;
      q->sidecar.row_scale = o->scale;
    }
  }
  q->owners.push_back(o);
  return q;
}

// stories260K with every wq quantized by hand (side-cars: f16, i8, none, ...).
LoadedModel QuantStories() {
  LoadedModel m = LoadStories();
  for (size_t i = 0; i < m.weights.layers.size(); ++i) {
    HostTensor& wq = m.weights.layers[i].wq;
    const auto type = std::array{Sidecar::ValueType::kF16, Sidecar::ValueType::kI8, Sidecar::ValueType::kNone}[i % 3];
    wq.quant = MakeQuant(wq.rows(), wq.cols(), type, static_cast<uint32_t>(i));
    wq.data.clear();
  }
  m.metadata["quant.bits_per_weight"] = "4.5";
  return m;
}

class NibbleFileTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir("nibble_nbl_"); }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  NibbleWriteOptions Fast() const {
    NibbleWriteOptions o;
    o.fsync = false;
    return o;
  }
  std::string dir_;
};

std::vector<float> Logits(LoadedModel m, const std::vector<int32_t>& ids) {
  auto model = LlamaModel::Create(std::move(m), 1);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  auto cache = (*model)->NewKVCache(static_cast<int>(ids.size()));
  std::vector<float> logits(ids.size() * (*model)->config().vocab_size);
  auto s = (*model)->Forward(ids, 0, cache.get(), logits, /*all_logits=*/true);
  EXPECT_TRUE(s.ok()) << s;
  return logits;
}

// ------------------------------------------------------------- round trips --

TEST_F(NibbleFileTest, Stories260KRoundTripIsBitIdenticalAndGivesSameLogits) {
  const LoadedModel m = LoadStories();
  ASSERT_FALSE(m.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  ASSERT_GT(m.config.n_layers, 0);
  const std::string path = Path("stories.nbl");
  ASSERT_TRUE(WriteNibbleFile(m, path).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const std::string bytes = ReadAll(path);
  ASSERT_GE(bytes.size(), 64u);
  EXPECT_EQ(bytes.substr(0, 4), "NIBL");

  auto back = LoadNibbleFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->source_format, "nibble");
  EXPECT_EQ(back->source_path, path);
  ExpectSameModel(m, *back);

  // Through the generic loader (detected by magic).
  auto via_loader = LoadModel(path);
  ASSERT_TRUE(via_loader.ok()) << via_loader.status();
  ExpectSameModel(m, *via_loader);

  const std::vector<int32_t> ids = {1, 403, 407, 261, 378, 9, 57, 300};
  const auto a = Logits(m, ids), b = Logits(*std::move(back), ids);
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

TEST_F(NibbleFileTest, Fp16MatricesKeepNormsExact) {
  const LoadedModel m = LoadStories();
  ASSERT_FALSE(m.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  NibbleWriteOptions o = Fast();
  o.fp16_matrices = true;
  ASSERT_TRUE(WriteNibbleFile(m, Path("f32.nbl"), Fast()).ok());
  ASSERT_TRUE(WriteNibbleFile(m, Path("f16.nbl"), o).ok());
  EXPECT_LT(fs::file_size(Path("f16.nbl")), fs::file_size(Path("f32.nbl")) * 6 / 10);
  auto back = LoadNibbleFile(Path("f16.nbl"));
  ASSERT_TRUE(back.ok()) << back.status();
  const auto sa = Slots(m.weights), sb = Slots(back->weights);
  for (size_t i = 0; i < sa.size(); ++i) {
    const HostTensor &x = *sa[i].second, &y = *sb[i].second;
    ASSERT_EQ(x.data.size(), y.data.size()) << sa[i].first;
    const bool norm = x.shape.size() == 1;
    for (size_t k = 0; k < x.data.size(); ++k) {
      if (norm) {
        ASSERT_EQ(FloatToBits(x.data[k]), FloatToBits(y.data[k])) << sa[i].first;
      } else {  // fp16 keeps 11 significant bits (values here are far from the subnormal range)
        ASSERT_LE(std::fabs(x.data[k] - y.data[k]), std::fabs(x.data[k]) * 0x1p-11f + 0x1p-24f) << sa[i].first;
      }
    }
  }
}

// fp16_vectors stores the norms as fp16 (matrices untouched): each norm
// value comes back as its fp16 rounding, bit for bit, and every matrix as it was.
TEST_F(NibbleFileTest, Fp16VectorsStoreNormsAsFp16) {
  const LoadedModel m = LoadStories();
  ASSERT_FALSE(m.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  NibbleWriteOptions o = Fast();
  o.fp16_vectors = true;
  ASSERT_TRUE(WriteNibbleFile(m, Path("n32.nbl"), Fast()).ok());
  ASSERT_TRUE(WriteNibbleFile(m, Path("n16.nbl"), o).ok());
  int64_t norm_values = 0;
  const auto sa = Slots(m.weights);
  for (const auto& [name, t] : sa) norm_values += t->shape.size() == 1 ? t->numel() : 0;
  ASSERT_GT(norm_values, 0);
  EXPECT_EQ(fs::file_size(Path("n32.nbl")) - fs::file_size(Path("n16.nbl")), static_cast<uintmax_t>(2 * norm_values))
      << "per 64-byte-aligned array the saving may differ; stories' norms are 64 values each";
  auto back = LoadNibbleFile(Path("n16.nbl"));
  ASSERT_TRUE(back.ok()) << back.status();
  const auto sb = Slots(back->weights);
  int rounded = 0;
  for (size_t i = 0; i < sa.size(); ++i) {
    const HostTensor &x = *sa[i].second, &y = *sb[i].second;
    ASSERT_EQ(x.data.size(), y.data.size()) << sa[i].first;
    for (size_t k = 0; k < x.data.size(); ++k) {
      const float want = x.shape.size() == 1 ? Fp16ToFp32(Fp32ToFp16(x.data[k])) : x.data[k];
      ASSERT_EQ(FloatToBits(want), FloatToBits(y.data[k])) << sa[i].first << " " << k;
      rounded += x.shape.size() == 1 && want != x.data[k];
    }
  }
  EXPECT_GT(rounded, 0);  // the fp32 norms were not all fp16 values already
}

// A finite weight beyond fp16's range (e.g. from a BF16 checkpoint) is an
// error naming the tensor, not a silent infinity; nothing is left at the path.
TEST_F(NibbleFileTest, Fp16MatricesRefuseValuesOutsideTheFp16Range) {
  LoadedModel m = LoadStories();
  ASSERT_FALSE(m.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  m.weights.layers[2].w_up.data[17] = 7.0e4f;
  NibbleWriteOptions o = Fast();
  o.fp16_matrices = true;
  const absl::Status st = WriteNibbleFile(m, Path("big.nbl"), o);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("fp16 range"), std::string::npos) << st;
  EXPECT_NE(st.message().find("index 17"), std::string::npos) << st;
  EXPECT_FALSE(fs::exists(Path("big.nbl")));
  EXPECT_TRUE(WriteNibbleFile(m, Path("big32.nbl"), Fast()).ok());  // fp32 storage takes it
}

TEST_F(NibbleFileTest, QuantizedTensorsRoundTripAsViewsOfTheMapping) {
  const LoadedModel m = QuantStories();
  ASSERT_FALSE(m.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  const std::string path = Path("quant.nbl");
  ASSERT_TRUE(WriteNibbleFile(m, path, Fast()).ok());
  auto back = LoadNibbleFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameModel(m, *back);
  // Zero-copy: the segments point into the mapped file at 64-byte aligned addresses,
  // and stay valid after the file is unlinked and the LoadedModel moved.
  LoadedModel moved = *std::move(back);
  fs::remove(path);
  for (const LayerWeights& l : moved.weights.layers) {
    ASSERT_TRUE(l.wq.is_quantized());
    EXPECT_TRUE(l.wq.data.empty());
    EXPECT_EQ(l.wq.quant->owners.size(), 1u);
    for (const QuantSegment& s : l.wq.quant->segments) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(s.data.data()) % 64, 0u);
    }
  }
  ExpectSameModel(m, moved);
}

TEST_F(NibbleFileTest, SentencePieceModelIsEmbedded) {
  const std::string sp = testing::SharedDir() + "/models/llama2-tokenizer.model";
  if (!fs::exists(sp)) GTEST_SKIP() << sp << " not present";
  LoadedModel m = LoadStories();
  ASSERT_FALSE(m.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  m.vocab = VocabSpec{};
  m.vocab.kind = TokenizerKind::kSentencePieceModel;
  m.vocab.sp_model_path = sp;
  m.vocab.bos_id = 1;
  m.vocab.eos_id = 2;
  const std::string path = Path("sp.nbl");
  ASSERT_TRUE(WriteNibbleFile(m, path, Fast()).ok());
  const std::string model_bytes = ReadAll(sp), file = ReadAll(path);
  ASSERT_FALSE(model_bytes.empty());
  EXPECT_NE(file.find(model_bytes), std::string::npos);
  auto back = LoadNibbleFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameModel(m, *back);
  EXPECT_EQ(back->vocab.sp_model_bytes, model_bytes);
  // The embedded model alone (no .model file on disk) tokenizes like the file.
  VocabSpec embedded = back->vocab;
  embedded.sp_model_path.clear();
  auto from_bytes = CreateTokenizer(embedded);
  ASSERT_TRUE(from_bytes.ok()) << from_bytes.status();
  auto from_file = CreateTokenizer(m.vocab);
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  auto a = (*from_bytes)->Encode("Hello world, naïve café 123", {});
  auto b = (*from_file)->Encode("Hello world, naïve café 123", {});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_GT(a->size(), 3u);
  // A missing .model file cannot be embedded.
  m.vocab.sp_model_path = Path("missing.model");
  auto s = WriteNibbleFile(m, Path("sp2.nbl"), Fast());
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s, "missing.model")) << s;
  EXPECT_FALSE(fs::exists(Path("sp2.nbl")));
}

TEST_F(NibbleFileTest, SmolLM2Gpt2VocabRoundTrip) {
  auto gguf = testing::SmolLM2Gguf();
  if (!gguf) GTEST_SKIP() << "SmolLM2 GGUF not present";
  auto m = LoadModel(*gguf);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->vocab.kind, TokenizerKind::kGpt2Bpe);
  ASSERT_FALSE(m->vocab.merges.empty());
  // Two layers keep the test fast; the vocabulary, embeddings and metadata are whole.
  m->config.n_layers = 2;
  m->weights.layers.resize(2);
  const std::string path = Path("smol.nbl");
  ASSERT_TRUE(WriteNibbleFile(*m, path, Fast()).ok());
  auto back = LoadNibbleFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_FALSE(back->chat_template.empty());
  ExpectSameModel(*m, *back);
}

TEST_F(NibbleFileTest, WriterRejectsInconsistentModels) {
  LoadedModel m = QuantStories();
  ASSERT_FALSE(m.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  auto q = std::make_shared<QuantTensor>(*m.weights.layers[1].wq.quant);
  q->segments[1].row_begin = 41;  // a gap between the segments
  m.weights.layers[1].wq.quant = q;
  auto s = WriteNibbleFile(m, Path("bad.nbl"), Fast());
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s, "layers.1.wq")) << s;
  EXPECT_FALSE(fs::exists(Path("bad.nbl")));
  EXPECT_FALSE(fs::exists(Path("bad.nbl.tmp")));

  LoadedModel t = LoadStories();
  ASSERT_FALSE(t.weights.layers.empty()) << "stories260K did not load (NIBBLE_SHARED_DIR?)";
  t.chat_template = "bad \xff utf-8";
  s = WriteNibbleFile(t, Path("bad2.nbl"), Fast());
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s, "chat_template")) << s;

  // Overwriting an existing file replaces it whole.
  ASSERT_TRUE(WriteNibbleFile(t = LoadStories(), Path("x.nbl"), Fast()).ok());
  ASSERT_TRUE(WriteNibbleFile(QuantStories(), Path("x.nbl"), Fast()).ok());
  auto back = LoadNibbleFile(Path("x.nbl"));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->weights.layers[0].wq.is_quantized());
}

// -------------------------------------------------------------- corruption --

// A nibble file split into its parts (docs/FORMAT.md layout) and put back
// together with fresh checksums and offsets.
struct Parts {
  json doc;
  std::string data;

  static Parts Split(const std::string& file) {
    uint64_t json_off, json_len, data_off;
    std::memcpy(&json_off, file.data() + 8, 8);
    std::memcpy(&json_len, file.data() + 16, 8);
    std::memcpy(&data_off, file.data() + 24, 8);
    return {json::parse(file.substr(json_off, json_len)), file.substr(data_off)};
  }
  std::string Join(uint32_t version = 1) const {
    const std::string text = doc.dump();
    const uint64_t json_off = 64, json_len = text.size(), data_off = (64 + text.size() + 63) / 64 * 64,
                   data_len = data.size();
    const uint32_t json_crc = Crc32c(text.data(), text.size()), flags = 0;
    std::string h(64, '\0');
    std::memcpy(h.data(), "NIBL", 4);
    std::memcpy(h.data() + 4, &version, 4);
    std::memcpy(h.data() + 8, &json_off, 8);
    std::memcpy(h.data() + 16, &json_len, 8);
    std::memcpy(h.data() + 24, &data_off, 8);
    std::memcpy(h.data() + 32, &data_len, 8);
    std::memcpy(h.data() + 40, &json_crc, 4);
    std::memcpy(h.data() + 44, &flags, 4);
    const uint32_t hcrc = Crc32c(h.data(), 60);
    std::memcpy(h.data() + 60, &hcrc, 4);
    std::string out = h + text;
    out.resize(data_off, '\0');
    return out + data;
  }
  json& Tensor(const std::string& name) {
    for (json& t : doc["tensors"]) {
      if (t["name"] == name) return t;
    }
    static json none;
    ADD_FAILURE() << "no tensor " << name;
    return none;
  }
  // Bytes of a reference; the CRC is refreshed by Recrc().
  char* At(const json& ref) { return data.data() + ref["offset"].get<uint64_t>(); }
  void Recrc(json& ref) { ref["crc32c"] = Crc32c(At(ref), ref["length"].get<uint64_t>()); }
};

class CorruptionTest : public NibbleFileTest {
 protected:
  void SetUp() override {
    NibbleFileTest::SetUp();
    ASSERT_TRUE(WriteNibbleFile(QuantStories(), Path("good.nbl"), Fast()).ok());
    good_ = ReadAll(Path("good.nbl"));
  }
  // Loads `bytes` from a file named bad.nbl: must fail naming it and `expect`.
  // The error is kept in last_.
  void ExpectFails(const std::string& bytes, const std::string& expect, NibbleLoadOptions o = {}) {
    const std::string path = Path("bad.nbl");
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
    ExpectLoadFails(path, expect, o);
  }
  void ExpectLoadFails(const std::string& path, const std::string& expect, NibbleLoadOptions o = {}) {
    auto m = LoadNibbleFile(path, o);
    EXPECT_FALSE(m.ok()) << "expected an error mentioning '" << expect << "'";
    last_ = m.status();
    if (m.ok()) return;
    EXPECT_TRUE(Contains(m.status(), path)) << m.status();
    EXPECT_TRUE(Contains(m.status(), expect)) << m.status();
  }
  // Overwrites bytes of an existing file in place.
  static void Patch(const std::string& path, uint64_t offset, const void* p, size_t n) {
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
  }
  void Edit(const std::function<void(Parts&)>& f, const std::string& expect) {
    Parts p = Parts::Split(good_);
    f(p);
    ExpectFails(p.Join(), expect);
  }
  std::string good_;
  absl::Status last_;
};

TEST_F(CorruptionTest, UntouchedRebuildLoads) {
  // The test's own reassembly produces a valid file: the edits below test one fault each.
  const std::string path = Path("same.nbl");
  std::ofstream(path, std::ios::binary) << Parts::Split(good_).Join();
  auto m = LoadNibbleFile(path);
  EXPECT_TRUE(m.ok()) << m.status();
}

TEST_F(CorruptionTest, FlippedBytes) {
  Parts p = Parts::Split(good_);
  // In the JSON directory.
  std::string bad = good_;
  bad[64 + 10] ^= 0x20;
  ExpectFails(bad, "JSON directory checksum mismatch");
  // In the header.
  bad = good_;
  bad[33] ^= 0x01;
  ExpectFails(bad, "header checksum");
  // In a tensor: fp32 and quantized segment and side-car.
  const uint64_t data_off = good_.size() - p.data.size();
  for (auto [name, field] : {std::pair{"layers.2.w_up", "data"}, std::pair{"layers.1.wq", "segments"},
                             std::pair{"layers.0.wq", "sidecar"}}) {
    const json& t = p.Tensor(name);
    const json& ref = std::string(field) == "data"       ? t["data"]
                      : std::string(field) == "segments" ? t["segments"][1]["data"]
                                                         : t["sidecar"]["values"];
    bad = good_;
    bad[data_off + ref["offset"].get<uint64_t>() + 3] ^= 0x40;
    ExpectFails(bad, name);
    EXPECT_TRUE(Contains(last_, "checksum mismatch")) << last_;
    EXPECT_EQ(last_.code(), absl::StatusCode::kDataLoss);
    // Without tensor checksums the (structurally valid) file loads.
    const std::string path = Path("flip.nbl");
    std::ofstream(path, std::ios::binary) << bad;
    NibbleLoadOptions o;
    o.verify_tensor_checksums = false;
    EXPECT_TRUE(LoadNibbleFile(path, o).ok()) << name;
  }
  // Vocabulary arrays are always verified.
  bad = good_;
  bad[data_off + p.doc["tokenizer"]["tokens"]["offset"].get<uint64_t>() + 100] ^= 0x01;
  NibbleLoadOptions o;
  o.verify_tensor_checksums = false;
  ExpectFails(bad, "tokenizer.tokens", o);
}

TEST_F(CorruptionTest, TruncatedAndExtended) {
  // One file cut shorter and shorter in place (no rewrites: keeps the test fast).
  const std::string path = Path("cut.nbl");
  std::ofstream(path, std::ios::binary) << good_;
  std::vector<size_t> cuts = {good_.size() - 1, 65, 64, 63, 4, 1};
  for (int i = 0; i < 120; ++i) cuts.push_back(good_.size() * i / 120 + (i % 5));
  std::sort(cuts.rbegin(), cuts.rend());
  for (size_t cut : cuts) {
    fs::resize_file(path, cut);
    ExpectLoadFails(path, cut == 0 ? "empty" : cut < 4 ? "bad magic" : "truncated");
  }
  ExpectFails(good_ + "x", "unexpected bytes");
  // Cuts inside the data section with a header rewritten to match (valid
  // header checksum): every reference past the new end must be caught.
  const Parts p = Parts::Split(good_);
  const uint64_t data_off = good_.size() - p.data.size();
  std::ofstream(path, std::ios::binary | std::ios::trunc) << good_;
  std::string header = good_.substr(0, 64);
  for (int i = 99; i >= 0; --i) {
    const uint64_t len = p.data.size() * i / 100 + (i % 3);
    fs::resize_file(path, data_off + len);
    std::memcpy(header.data() + 32, &len, 8);
    const uint32_t crc = Crc32c(header.data(), 60);
    std::memcpy(header.data() + 60, &crc, 4);
    Patch(path, 0, header.data(), 64);
    ExpectLoadFails(path, "past the end of the file");
  }
}

TEST_F(CorruptionTest, HeaderFaults) {
  std::string bad = good_;
  bad[0] = 'G';
  ExpectFails(bad, "bad magic");
  ExpectFails(Parts::Split(good_).Join(/*version=*/3), "version 3");
  EXPECT_EQ(last_.code(), absl::StatusCode::kUnimplemented);
  ExpectFails(Parts::Split(good_).Join(/*version=*/0), "version 0");
  EXPECT_EQ(last_.code(), absl::StatusCode::kUnimplemented);
  // A version-2 header over a version-1 directory: the JSON's version must match.
  ExpectFails(Parts::Split(good_).Join(/*version=*/2), "does not match the header");
  // residual_rotation is a version-2 key: refused in a version-1 file.
  Edit([](Parts& p) { p.doc["config"]["residual_rotation"] = 5; }, "residual_rotation needs file version 2");
  Edit([](Parts& p) { p.doc["version"] = 7; }, "version 7");
}

TEST_F(CorruptionTest, BadOffsets) {
  const uint64_t data_len = Parts::Split(good_).data.size();
  Edit([&](Parts& p) { p.Tensor("final_norm")["data"]["offset"] = (data_len + 64) / 64 * 64; }, "final_norm");
  Edit([&](Parts& p) { p.Tensor("final_norm")["data"]["length"] = uint64_t{1} << 62; }, "past the end");
  Edit([&](Parts& p) { p.Tensor("layers.1.wq")["segments"][0]["data"]["offset"] = 1ull << 63; }, "layers.1.wq");
  Edit([](Parts& p) { p.Tensor("layers.1.wq")["segments"][0]["data"]["offset"] = 64 * 3 + 4; },
       "is not a multiple of 64");
  Edit([](Parts& p) { p.Tensor("layers.0.wq")["sidecar"]["col"]["offset"] = 8; }, "layers.0.wq' side-car.col");
  Edit([](Parts& p) { p.Tensor("layers.2.w_up")["data"]["length"] = 4; }, "layers.2.w_up");
  Edit([](Parts& p) { p.Tensor("layers.2.w_up")["data"]["offset"] = -64; }, "offset");
}

TEST_F(CorruptionTest, FormatAndShapeFaults) {
  Edit([](Parts& p) { p.Tensor("layers.1.wq")["segments"][1]["format"] = "int5_g64"; },
       "unknown format name 'int5_g64'");
  // A valid format with another row size: the stored bytes no longer fit.
  Edit([](Parts& p) { p.Tensor("layers.1.wq")["segments"][1]["format"] = "int8_g32"; }, "layers.1.wq");
  Edit([](Parts& p) { p.Tensor("layers.1.wq")["segments"][0]["row_end"] = 39; }, "segment 0");
  Edit([](Parts& p) { p.Tensor("layers.1.wq")["segments"].erase(1); }, "layers.1.wq");
  Edit([](Parts& p) { p.Tensor("layers.1.wq")["shape"] = json::array({64, 65}); }, "layers.1.wq");
  Edit([](Parts& p) { p.Tensor("final_norm")["shape"] = json::array({0}); }, "final_norm");
  Edit([](Parts& p) { p.Tensor("final_norm")["storage"] = "bf16"; }, "unknown storage 'bf16'");
  Edit([](Parts& p) { p.Tensor("final_norm")["name"] = "final_norm2"; }, "unknown tensor 'final_norm2'");
  Edit([](Parts& p) { p.doc["tensors"].erase(3); }, "is missing");
  Edit([](Parts& p) { p.doc["tensors"].push_back(p.doc["tensors"][0]); }, "duplicate tensor");
  Edit([](Parts& p) { p.doc["config"].erase("n_kv_heads"); }, "n_kv_heads");
  Edit([](Parts& p) { p.doc["config"]["dim"] = "64"; }, "dim");
  Edit([](Parts& p) { p.doc["config"]["n_heads"] = 7; }, "n_heads");
  Edit([](Parts& p) { p.doc["config"]["rope_style"] = "sideways"; }, "rope_style");
  Edit([](Parts& p) { p.doc["tokenizer"]["kind"] = "wordpiece"; }, "wordpiece");
  Edit([](Parts& p) { p.doc["tokenizer"]["bos_id"] = 100000; }, "bos_id");
  Edit([](Parts& p) { p.doc["tokenizer"]["tokens"]["count"] = 511; }, "tokenizer.tokens");
  Edit([](Parts& p) { p.doc["metadata"]["x"] = 3; }, "metadata");
  Edit([](Parts& p) { p.doc = json::array(); }, "JSON");
}

TEST_F(CorruptionTest, InconsistentSidecar) {
  // Sizes.
  Edit([](Parts& p) { p.Tensor("layers.0.wq")["sidecar"]["nnz"] = 1; }, "nnz");
  Edit([](Parts& p) { p.Tensor("layers.0.wq")["sidecar"]["type"] = "f32"; }, "unknown side-car type 'f32'");
  Edit([](Parts& p) { p.Tensor("layers.0.wq")["sidecar"]["type"] = "i8"; }, "layers.0.wq");
  Edit([](Parts& p) { p.Tensor("layers.1.wq")["sidecar"].erase("row_scale"); }, "row_scale");
  Edit(
      [](Parts& p) {
        json& ref = p.Tensor("layers.0.wq")["sidecar"]["row_ptr"];
        ref["length"] = 64 * 4;
        p.Recrc(ref);
      },
      "row_ptr has 64 entries, expected rows + 1 = 65");
  // Contents, with valid checksums: row_ptr decreasing, last != nnz, a column past the end.
  Edit(
      [](Parts& p) {
        json& ref = p.Tensor("layers.0.wq")["sidecar"]["row_ptr"];
        uint32_t* rp = reinterpret_cast<uint32_t*>(p.At(ref));
        rp[5] = rp[6] + 1;
        p.Recrc(ref);
      },
      "row_ptr decreases at row");
  Edit(
      [](Parts& p) {
        json& ref = p.Tensor("layers.0.wq")["sidecar"]["row_ptr"];
        uint32_t* rp = reinterpret_cast<uint32_t*>(p.At(ref));
        rp[ref["length"].get<uint64_t>() / 4 - 1] += 1;
        p.Recrc(ref);
      },
      "but nnz");
  Edit(
      [](Parts& p) {
        json& ref = p.Tensor("layers.1.wq")["sidecar"]["col"];
        reinterpret_cast<uint16_t*>(p.At(ref))[0] = 64;
        p.Recrc(ref);
      },
      "column 64 >= cols 64");
}

TEST_F(CorruptionTest, RandomByteFlipsNeverCrash) {
  std::mt19937 rng(1);
  const std::string path = Path("flip.nbl");
  std::ofstream(path, std::ios::binary) << good_;
  int failed = 0;
  for (int i = 0; i < 150; ++i) {
    const size_t pos = rng() % good_.size();
    const char flipped = static_cast<char>(good_[pos] ^ static_cast<char>(1 + rng() % 255));
    Patch(path, pos, &flipped, 1);
    auto m = LoadNibbleFile(path);
    if (!m.ok()) {
      ++failed;
      EXPECT_TRUE(Contains(m.status(), path)) << m.status();
    }
    Patch(path, pos, &good_[pos], 1);
  }
  // Only alignment padding is outside every checksum.
  EXPECT_GT(failed, 100);
  EXPECT_TRUE(LoadNibbleFile(path).ok());
}

}  // namespace
}  // namespace nibble::io
