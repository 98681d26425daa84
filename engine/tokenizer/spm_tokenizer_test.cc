// The SentencePiece .model tokenizer (kSentencePieceModel, native) on the
// Llama 2 tokenizer, and our score-ordered BPE (kSpmScores, ▁ style) built from
// the same pieces/scores/types: both must encode everything token for token
// alike. (Both are checked against the SentencePiece library itself in
// tests/spm/sp_native_test.cc.)
#include <chrono>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/tokenizer/sentencepiece_vocab.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::SharedDir;
using ::nibble::testing::SourceDir;
using ::nibble::testing::WriteTempFile;

std::string Llama2Model() { return SharedDir() + "/models/llama2-tokenizer.model"; }

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> Corpus() {
  std::ifstream in(SourceDir() + "/tests/fixtures/tokenize_corpus.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  std::vector<std::string> texts = j["texts"];
  for (const auto& t : j["special_texts"]) texts.push_back(t);
  return texts;
}

class SpmVsSentencePiece : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    VocabSpec v;
    absl::Status s = ReadSentencePieceVocab(Llama2Model(), &v);
    ASSERT_TRUE(s.ok()) << s;
    auto sp = CreateTokenizer(v);
    ASSERT_TRUE(sp.ok()) << sp.status();
    sp_ = sp->release();
    v.kind = TokenizerKind::kSpmScores;  // same vocabulary, our BPE
    v.sp_model_path.clear();
    auto ours = CreateTokenizer(v);
    ASSERT_TRUE(ours.ok()) << ours.status();
    ours_ = ours->release();
  }
  static void TearDownTestSuite() {
    delete sp_;
    delete ours_;
  }
  static Tokenizer* sp_;
  static Tokenizer* ours_;
};
Tokenizer* SpmVsSentencePiece::sp_ = nullptr;
Tokenizer* SpmVsSentencePiece::ours_ = nullptr;

TEST_F(SpmVsSentencePiece, VocabularyFromTheModel) {
  const VocabSpec& v = sp_->spec();
  ASSERT_EQ(v.tokens.size(), 32000u);
  EXPECT_EQ(sp_->vocab_size(), 32000);
  EXPECT_EQ(v.bos_id, 1);
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_EQ(v.unk_id, 0);
  EXPECT_TRUE(v.add_space_prefix);
  EXPECT_TRUE(sp_->ShouldAddBos());
  EXPECT_EQ(v.token_types[0], TokenType::kUnknown);
  EXPECT_EQ(v.token_types[1], TokenType::kControl);
  EXPECT_EQ(v.token_types[3 + 0x0A], TokenType::kByte);
  EXPECT_EQ(v.tokens[3 + 0x0A], "<0x0A>");
  EXPECT_EQ(sp_->PieceToId("\xE2\x96\x81the"), ours_->PieceToId("\xE2\x96\x81the"));
  EXPECT_GE(sp_->PieceToId("\xE2\x96\x81the"), 0);
  EXPECT_EQ(sp_->PieceToId("definitely not a piece"), -1);
  EXPECT_EQ(sp_->TokenBytes(3 + 0x0A), "\n");
  EXPECT_EQ(ours_->TokenBytes(3 + 0x0A), "\n");
  EXPECT_EQ(sp_->TokenBytes(sp_->PieceToId("\xE2\x96\x81the")), " the");
  EXPECT_EQ(ours_->TokenBytes(ours_->PieceToId("\xE2\x96\x81the")), " the");
  EXPECT_EQ(sp_->TokenBytes(2), "");
  EXPECT_EQ(sp_->TokenBytes(2, /*special=*/true), "</s>");
}

TEST_F(SpmVsSentencePiece, CorpusTokenForToken) {
  const std::vector<std::string> corpus = Corpus();
  ASSERT_GE(corpus.size(), 30u);
  for (const std::string& text : corpus) {
    for (bool bos : {true, false}) {
      auto want = sp_->Encode(text, {.add_bos = bos});
      auto got = ours_->Encode(text, {.add_bos = bos});
      ASSERT_TRUE(want.ok() && got.ok());
      EXPECT_EQ(*got, *want) << "text: " << text;
    }
    auto ids = ours_->Encode(text, {});
    EXPECT_EQ(ours_->Decode(*ids), text);
    EXPECT_EQ(sp_->Decode(*ids), text);
  }
}

TEST_F(SpmVsSentencePiece, WikitextTokenForTokenAndFast) {
  const std::string text = ReadAll(SharedDir() + "/data/wikitext-2-test.txt");
  ASSERT_EQ(text.size(), 1296370u);
  auto want = sp_->Encode(text, {});
  ASSERT_TRUE(want.ok());
  const auto t0 = std::chrono::steady_clock::now();
  auto got = ours_->Encode(text, {});
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(got.ok());
  ASSERT_EQ(got->size(), want->size());
  EXPECT_TRUE(*got == *want);
  for (size_t i = 0; i < got->size(); ++i) {
    if ((*got)[i] != (*want)[i]) {
      ADD_FAILURE() << "first difference at token " << i;
      break;
    }
  }
  // O(n log n): the naive O(n^2) merge loop takes minutes on this text.
  EXPECT_LT(secs, 5.0) << "whole-file encode took " << secs << " s";
  std::printf("kSpmScores: %zu bytes -> %zu tokens in %.3f s\n", text.size(), got->size(), secs);
  EXPECT_EQ(ours_->Decode(*got), text);
}

TEST_F(SpmVsSentencePiece, OneLongLineWithoutByteFallback) {
  // No newline (a byte piece) to cut the text into segments: one big heap.
  std::string text = ReadAll(SharedDir() + "/data/wikitext-2-test.txt").substr(0, 300000);
  std::replace(text.begin(), text.end(), '\n', ' ');
  const auto t0 = std::chrono::steady_clock::now();
  auto got = ours_->Encode(text, {});
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(*got == *sp_->Encode(text, {}));
  EXPECT_LT(secs, 2.0);
  std::printf("kSpmScores: one %zu-byte line -> %zu tokens in %.3f s\n", text.size(), got->size(), secs);
}

TEST_F(SpmVsSentencePiece, ParseSpecialSplitsControlTokens) {
  const std::string text = "<s>Hello</s> world";
  auto plain = ours_->Encode(text, {.add_bos = false, .parse_special = false});
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(*plain, *sp_->Encode(text, {.add_bos = false}));  // "<s>" as text
  EXPECT_EQ(std::count(plain->begin(), plain->end(), 1), 0);

  auto special = ours_->Encode(text, {.add_bos = false, .parse_special = true});
  ASSERT_TRUE(special.ok());
  // Each raw fragment after a special token gets the dummy prefix (llama.cpp).
  const std::vector<int32_t> hello = *sp_->Encode("Hello", {.add_bos = false});
  const std::vector<int32_t> world = *sp_->Encode(" world", {.add_bos = false});
  std::vector<int32_t> want = {1};
  want.insert(want.end(), hello.begin(), hello.end());
  want.push_back(2);
  want.insert(want.end(), world.begin(), world.end());
  EXPECT_EQ(*special, want);
  EXPECT_EQ(*sp_->Encode(text, {.add_bos = false, .parse_special = true}), want);
  // Decode drops the dummy space after every BOS, not after other tokens.
  EXPECT_EQ(ours_->Decode(*special, /*special=*/true), "<s>Hello</s>  world");
}

TEST(SentencePieceModel, KindAndPathOnlyIsFilledFromTheModel) {
  VocabSpec v;
  v.kind = TokenizerKind::kSentencePieceModel;
  v.sp_model_path = Llama2Model();
  auto tok = CreateTokenizer(v);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 32000);
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  auto ids = (*tok)->Encode("Hello world", {});
  ASSERT_TRUE(ids.ok());
  ASSERT_FALSE(ids->empty());
  EXPECT_EQ(ids->front(), 1);
  EXPECT_EQ((*tok)->Decode(*ids), "Hello world");
}

TEST(SentencePieceModel, MissingOrCorruptModelNamesPath) {
  VocabSpec v;
  v.kind = TokenizerKind::kSentencePieceModel;
  v.sp_model_path = "/nonexistent/dir/tokenizer.model";
  auto missing = CreateTokenizer(v);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(v.sp_model_path), std::string::npos);

  const std::string good = ReadAll(Llama2Model());
  for (const std::string& bad : {std::string("this is not a protobuf at all \xFF\xFF\xFF"),
                                 good.substr(0, good.size() / 2)}) {
    v.sp_model_path = WriteTempFile("corrupt.model", bad);
    auto corrupt = CreateTokenizer(v);
    ASSERT_FALSE(corrupt.ok());
    EXPECT_NE(corrupt.status().message().find(v.sp_model_path), std::string::npos) << corrupt.status();
  }
  VocabSpec out;
  EXPECT_FALSE(ReadSentencePieceVocab("/nonexistent/x.model", &out).ok());
}

}  // namespace
}  // namespace nibble
