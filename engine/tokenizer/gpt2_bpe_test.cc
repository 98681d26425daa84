// GPT-2 byte-level BPE (kGpt2Bpe) against llama.cpp on SmolLM2's vocabulary.
//
// Reference: tests/fixtures/smollm2_llamacpp_tokens.json, written by
// bench/llamacpp_tokenize.py with the llama_cpp Python package (llama.cpp's
// own tokenizer) from tests/fixtures/tokenize_corpus.json and the perplexity
// texts in ../shared/data.
#include <chrono>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/io/gguf.h"
#include "engine/io/gguf_model.h"
#include "engine/tokenizer/gpt2_pretokenizer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::SharedDir;
using ::nibble::testing::SmolLM2Gguf;
using ::nibble::testing::SourceDir;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// FNV-1a 64 over the ids as int32 little-endian, as bench/llamacpp_tokenize.py.
std::string Fnv1a64(const std::vector<int32_t>& ids) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (int32_t id : ids) {
    const auto u = static_cast<uint32_t>(id);
    for (int k = 0; k < 4; ++k) {
      h ^= (u >> (8 * k)) & 0xFF;
      h *= 0x100000001B3ull;
    }
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

class SmolLM2Bpe : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto path = SmolLM2Gguf();
    if (!path) return;
    auto file = io::GgufFile::Open(*path);
    ASSERT_TRUE(file.ok()) << file.status();
    VocabSpec v;
    absl::Status s = io::ReadGgufVocab(**file, &v);
    ASSERT_TRUE(s.ok()) << s;
    spec_ = new VocabSpec(v);
    auto tok = CreateTokenizer(std::move(v));
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = tok->release();
    std::ifstream in(SourceDir() + "/tests/fixtures/smollm2_llamacpp_tokens.json");
    ASSERT_TRUE(in.good()) << "missing fixture; run bench/llamacpp_tokenize.py";
    ref_ = new nlohmann::json(nlohmann::json::parse(in));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete ref_;
    delete spec_;
  }
  void SetUp() override {
    if (tok_ == nullptr) GTEST_SKIP() << "SmolLM2 GGUF not present";
  }
  static Tokenizer* tok_;
  static nlohmann::json* ref_;
  static VocabSpec* spec_;
};
Tokenizer* SmolLM2Bpe::tok_ = nullptr;
nlohmann::json* SmolLM2Bpe::ref_ = nullptr;
VocabSpec* SmolLM2Bpe::spec_ = nullptr;

TEST_F(SmolLM2Bpe, Vocabulary) {
  const VocabSpec& v = tok_->spec();
  EXPECT_EQ(v.kind, TokenizerKind::kGpt2Bpe);
  EXPECT_EQ(v.pre, "smollm");
  EXPECT_EQ(tok_->vocab_size(), 49152);
  EXPECT_FALSE(tok_->ShouldAddBos());  // SmolLM2: add_bos_token = false
  EXPECT_FALSE(v.add_space_prefix);
  EXPECT_EQ(tok_->PieceToId("<|im_start|>"), 1);
  EXPECT_EQ(tok_->TokenBytes(1), "");
  EXPECT_EQ(tok_->TokenBytes(1, /*special=*/true), "<|im_start|>");
  EXPECT_EQ(tok_->TokenBytes(tok_->PieceToId("\xC4\xA0")), " ");   // "Ġ"
  EXPECT_EQ(tok_->TokenBytes(tok_->PieceToId("\xC4\x8A")), "\n");  // "Ċ"
  EXPECT_TRUE(tok_->IsEndOfGeneration(2));  // <|im_end|> is eos
}

TEST_F(SmolLM2Bpe, CorpusMatchesLlamaCpp) {
  const auto& cases = (*ref_)["cases"];
  ASSERT_GE(cases.size(), 35u);
  int n_special = 0;
  for (const auto& c : cases) {
    const std::string text = c["text"];
    const bool special = c["special"];
    const std::vector<int32_t> want = c["ids"];
    auto got = tok_->Encode(text, {.add_bos = true, .parse_special = special});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, want) << "text: " << text << " special=" << special;
    EXPECT_EQ(tok_->Decode(*got, /*special=*/special), text);
    n_special += special;
  }
  EXPECT_GE(n_special, 4);
}

TEST_F(SmolLM2Bpe, WholeFilesMatchLlamaCpp) {
  for (const auto& f : (*ref_)["files"]) {
    const std::string rel = f["path"];
    const std::string text = ReadAll(SharedDir() + "/" + rel);
    ASSERT_EQ(text.size(), f["n_bytes"].get<size_t>()) << rel;
    const auto t0 = std::chrono::steady_clock::now();
    auto got = tok_->Encode(text, {.add_bos = true, .parse_special = f["special"].get<bool>()});
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(got.ok()) << got.status();
    const std::vector<int32_t> head = f["head_ids"];
    ASSERT_GE(got->size(), head.size());
    EXPECT_EQ(std::vector<int32_t>(got->begin(), got->begin() + head.size()), head) << rel;
    EXPECT_EQ(got->size(), f["count"].get<size_t>()) << rel;
    EXPECT_EQ(Fnv1a64(*got), f["fnv1a64"].get<std::string>()) << rel;
    EXPECT_LT(secs, 5.0) << rel << " took " << secs << " s";
    EXPECT_EQ(tok_->Decode(*got, /*special=*/true), text) << rel;
  }
}

// The same vocabulary under other pre-tokenizer names: llama.cpp tokenized it
// from vocab-only GGUF copies whose tokenizer.ggml.pre was rewritten.
TEST_F(SmolLM2Bpe, OtherPreTokenizersMatchLlamaCpp) {
  std::vector<std::string> texts;
  for (const auto& c : (*ref_)["cases"]) {
    if (!c["special"].get<bool>()) texts.push_back(c["text"]);
  }
  const auto& variants = (*ref_)["pre_variants"];
  ASSERT_GE(variants.size(), 6u);
  for (const auto& var : variants) {
    VocabSpec v = *spec_;
    v.pre = var["pre"];
    auto tok = CreateTokenizer(v);
    ASSERT_TRUE(tok.ok()) << tok.status();
    const auto& ids = var["ids"];
    ASSERT_EQ(ids.size(), texts.size());
    for (size_t i = 0; i < texts.size(); ++i) {
      const std::vector<int32_t> want = ids[i];
      auto got = (*tok)->Encode(texts[i], {.add_bos = false});
      ASSERT_TRUE(got.ok());
      EXPECT_EQ(*got, want) << "pre=" << v.pre << " text: " << texts[i];
    }
    const auto& f = var["file"];
    const std::string head =
        ReadAll(SharedDir() + "/" + f["path"].get<std::string>()).substr(0, f["n_bytes"].get<size_t>());
    auto got = (*tok)->Encode(head, {.add_bos = false});
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(got->size(), f["count"].get<size_t>()) << "pre=" << v.pre;
    EXPECT_EQ(Fnv1a64(*got), f["fnv1a64"].get<std::string>()) << "pre=" << v.pre;
  }
}

TEST_F(SmolLM2Bpe, InvalidUtf8MatchesLlamaCpp) {
  const auto& cases = (*ref_)["byte_cases"];
  ASSERT_GE(cases.size(), 3u);
  for (const auto& c : cases) {
    const std::string hex = c["hex"];
    std::string raw;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) {
      raw.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    }
    const std::vector<int32_t> want = c["ids"];
    auto got = tok_->Encode(raw, {});
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(*got, want) << "hex: " << hex;
    // Decoding gives the text with each broken byte replaced by U+FFFD.
    EXPECT_EQ(tok_->Decode(*got), utf8::Sanitize(raw, /*per_byte=*/true));
  }
  auto ids = tok_->Encode(std::string("ok\xFF\xE4\xB8 done", 10), {});
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(tok_->Decode(*ids), "ok\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD done");
}

TEST_F(SmolLM2Bpe, StreamingDetokenizerOnEmoji) {
  const std::string text = "Family: 👨‍👩‍👧‍👦 and 日本語";
  auto ids = tok_->Encode(text, {});
  ASSERT_TRUE(ids.ok());
  StreamingDetokenizer d(*tok_);
  std::string all;
  for (int32_t id : *ids) {
    std::string piece = d.Push(id);
    EXPECT_TRUE(utf8::IsValid(piece));
    all += piece;
  }
  EXPECT_EQ(all + d.Flush(), text);
}

std::vector<std::string> Words(const PreTokenizer& p, std::string_view text) {
  std::vector<std::string_view> w;
  EXPECT_TRUE(p.Split(text, &w).ok());
  return {w.begin(), w.end()};
}

TEST(PreTokenizer, Gpt2Regex) {
  auto p = PreTokenizer::Create("gpt2");
  ASSERT_TRUE(p.ok());
  using V = std::vector<std::string>;
  EXPECT_EQ(Words(**p, "Hello world's  end 123!!"),
            (V{"Hello", " world", "'s", " ", " end", " 123", "!!"}));
  // The last white space before a non-space is left for the next word; a lone
  // "\n" is matched by the trailing "\s+" (llama.cpp's custom gpt2 splitter).
  EXPECT_EQ(Words(**p, "a   \n\nb"), (V{"a", "   \n", "\n", "b"}));
  EXPECT_EQ(Words(**p, "x  "), (V{"x", "  "}));
  EXPECT_EQ(Words(**p, ""), V{});
}

TEST(PreTokenizer, SmolLMSplitsDigitsFirst) {
  auto p = PreTokenizer::Create("smollm");
  ASSERT_TRUE(p.ok());
  using V = std::vector<std::string>;
  EXPECT_EQ(Words(**p, "a 123b"), (V{"a", " ", "1", "2", "3", "b"}));
}

TEST(PreTokenizer, Llama3AndQwen2) {
  using V = std::vector<std::string>;
  auto l3 = PreTokenizer::Create("llama-bpe");
  ASSERT_TRUE(l3.ok());
  EXPECT_TRUE((*l3)->ignore_merges());
  EXPECT_EQ(Words(**l3, "I'M 12345 ok\n\n  x"), (V{"I", "'M", " ", "123", "45", " ok", "\n\n", " ", " x"}));
  auto q2 = PreTokenizer::Create("qwen2");
  ASSERT_TRUE(q2.ok());
  EXPECT_FALSE((*q2)->ignore_merges());
  EXPECT_EQ(Words(**q2, "x 123"), (V{"x", " ", "1", "2", "3"}));
  auto unknown = PreTokenizer::Create("no-such-pre");
  ASSERT_TRUE(unknown.ok());
  EXPECT_EQ((*unknown)->name(), "gpt2");
  for (const char* name : {"default", "", "falcon", "starcoder", "gpt-4o", "tekken", "dbrx"}) {
    auto p = PreTokenizer::Create(name);
    ASSERT_TRUE(p.ok()) << name << ": " << p.status();
    EXPECT_FALSE(Words(**p, "Hello, World 42 ünï 日本 😀\n").empty()) << name;
  }
}

TEST(Gpt2Bpe, TinyHandMadeVocabulary) {
  // "abc": a+b (rank 0) then ab+c (rank 1). " abcc": Ġ+a (rank 2) loses to
  // a+b (rank 0), then ab+c; Ġ stays alone since "Ġ ab" is no merge.
  VocabSpec v;
  v.kind = TokenizerKind::kGpt2Bpe;
  v.pre = "gpt2";
  v.tokens = {"a", "b", "c", "ab", "abc", "\xC4\xA0", "\xC4\xA0" "a", "<|eot|>"};
  v.token_types = std::vector<TokenType>(v.tokens.size(), TokenType::kNormal);
  v.token_types[7] = TokenType::kControl;
  v.merges = {"a b", "ab c", "\xC4\xA0 a"};
  v.add_bos = false;
  auto tok = CreateTokenizer(v);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(*(*tok)->Encode("abc abcc", {}), (std::vector<int32_t>{4, 5, 4, 2}));
  EXPECT_EQ(*(*tok)->Encode(" a", {}), (std::vector<int32_t>{6}));
  EXPECT_EQ(*(*tok)->Encode("a<|eot|>", {.parse_special = true}), (std::vector<int32_t>{0, 7}));
  EXPECT_EQ((*tok)->Decode(std::vector<int32_t>{4, 5, 4, 2}), "abc abcc");

  v.merges = {"nospace"};
  EXPECT_FALSE(CreateTokenizer(v).ok());
}

}  // namespace
}  // namespace nibble
