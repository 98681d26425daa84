// llama2.c vocabulary (tok512.bin) reader, the kSpmScores tokenizer on it,
// Decode/StreamingDetokenizer, and malformed-file handling.
//
// Reference ids: tests/fixtures/tok512_llama2c_tokens.json, produced by
// tests/fixtures/gen_spm_reference.py (a naive Python port of llama2.c run.c).
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/tokenizer/llama2c_vocab.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::SourceDir;
using ::nibble::testing::Stories260KTokenizer;
using ::nibble::testing::WriteTempFile;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::unique_ptr<Tokenizer> Tok512() {
  VocabSpec v;
  absl::Status s = ReadLlama2cVocab(Stories260KTokenizer(), 512, &v);
  EXPECT_TRUE(s.ok()) << s;
  auto tok = CreateTokenizer(std::move(v));
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

TEST(Llama2cVocab, ReadsTok512) {
  VocabSpec v;
  ASSERT_TRUE(ReadLlama2cVocab(Stories260KTokenizer(), 512, &v).ok());
  EXPECT_EQ(v.kind, TokenizerKind::kSpmScores);
  ASSERT_EQ(v.tokens.size(), 512u);
  ASSERT_EQ(v.scores.size(), 512u);
  EXPECT_EQ(v.max_token_len, 7);
  EXPECT_EQ(v.bos_id, 1);
  EXPECT_EQ(v.eos_id, 2);
  EXPECT_EQ(v.unk_id, 0);
  EXPECT_EQ(v.tokens[0], "<unk>");
  EXPECT_EQ(v.tokens[3], "<0x00>");
  EXPECT_EQ(v.token_types[3 + 0x0A], TokenType::kByte);
  EXPECT_EQ(v.token_types[1], TokenType::kControl);
  EXPECT_EQ(v.tokens[259], " t");  // first merge piece: plain-space style
  EXPECT_TRUE(v.add_bos && v.add_space_prefix && v.strip_space_after_bos);

  VocabSpec until_eof;  // vocab_size <= 0: read to the end of the file
  ASSERT_TRUE(ReadLlama2cVocab(Stories260KTokenizer(), 0, &until_eof).ok());
  EXPECT_EQ(until_eof.tokens, v.tokens);
}

TEST(Llama2cVocab, MissingFileNamesPath) {
  VocabSpec v;
  absl::Status s = ReadLlama2cVocab("/nonexistent/tok9.bin", 512, &v);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("/nonexistent/tok9.bin"), std::string::npos) << s;
}

TEST(Llama2cVocab, TruncatedCopiesFailWithPath) {
  const std::string good = ReadAll(Stories260KTokenizer());
  ASSERT_EQ(good.size(), 6227u);
  // Every cut point in the header and the first tokens, then a stride.
  for (size_t cut = 1; cut < good.size(); cut += (cut < 300 ? 1 : 37)) {
    const std::string path = WriteTempFile("tok512_cut.bin", good.substr(0, cut));
    VocabSpec v;
    absl::Status s = ReadLlama2cVocab(path, 512, &v);
    ASSERT_FALSE(s.ok()) << "cut at " << cut;
    EXPECT_NE(s.message().find(path), std::string::npos) << s;
  }
  // The empty file too (MappedFile refuses it).
  VocabSpec v;
  const std::string empty = WriteTempFile("tok512_empty.bin", "");
  EXPECT_FALSE(ReadLlama2cVocab(empty, 512, &v).ok());
}

TEST(Llama2cVocab, CorruptFieldsFailWithPath) {
  const std::string good = ReadAll(Stories260KTokenizer());
  auto put_i32 = [](std::string* s, size_t off, int32_t v) { std::memcpy(s->data() + off, &v, 4); };
  struct Case {
    const char* name;
    std::string data;
    int32_t vocab_size;
  };
  std::vector<Case> cases;
  {
    std::string d = good;
    put_i32(&d, 0, -5);  // max_token_length
    cases.push_back({"negative max_token_length", d, 512});
  }
  {
    std::string d = good;
    put_i32(&d, 4 + 4, -1);  // token 0 length
    cases.push_back({"negative token length", d, 512});
  }
  {
    std::string d = good;
    put_i32(&d, 4 + 4, 0x7fffffff);  // token 0 length, huge
    cases.push_back({"huge token length", d, 512});
  }
  {
    std::string d = good;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(d.data() + 4, &nan, 4);  // token 0 score
    cases.push_back({"NaN score", d, 512});
  }
  cases.push_back({"trailing bytes", good + "xyz", 512});
  cases.push_back({"vocab_size too large", good, 513});
  cases.push_back({"vocab_size absurd", good, 2000000000});
  cases.push_back({"fewer tokens than declared", good, 511});  // leaves trailing bytes
  for (const Case& c : cases) {
    const std::string path = WriteTempFile("tok512_bad.bin", c.data);
    VocabSpec v;
    absl::Status s = ReadLlama2cVocab(path, c.vocab_size, &v);
    EXPECT_FALSE(s.ok()) << c.name;
    EXPECT_NE(s.message().find(path), std::string::npos) << c.name << ": " << s;
  }
}

TEST(SpmScores, Tok512MatchesLlama2cReference) {
  auto tok = Tok512();
  ASSERT_NE(tok, nullptr);
  std::ifstream in(SourceDir() + "/tests/fixtures/tok512_llama2c_tokens.json");
  ASSERT_TRUE(in.good()) << "missing fixture; run tests/fixtures/gen_spm_reference.py";
  const nlohmann::json j = nlohmann::json::parse(in);
  ASSERT_GE(j["cases"].size(), 40u);
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"];
    const std::vector<int32_t> want = c["ids"];
    auto got = tok->Encode(text, {.add_bos = true, .parse_special = false});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, want) << "text: " << text;
    // Decode undoes the dummy prefix after BOS and the byte fallback exactly.
    EXPECT_EQ(tok->Decode(*got), text);
  }
}

TEST(SpmScores, OnceUponATimeRoundTrip) {
  auto tok = Tok512();
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("Once upon a time", {});
  ASSERT_TRUE(ids.ok());
  // BOS, then pieces; "Once" must be one piece in this vocabulary.
  ASSERT_GE(ids->size(), 2u);
  EXPECT_EQ((*ids)[0], 1);
  EXPECT_EQ(tok->TokenBytes((*ids)[1]), " Once");
  EXPECT_EQ(tok->Decode(*ids), "Once upon a time");
  auto no_bos = tok->Encode("Once upon a time", {.add_bos = false});
  ASSERT_TRUE(no_bos.ok());
  EXPECT_EQ(std::vector<int32_t>(ids->begin() + 1, ids->end()), *no_bos);
  // Without BOS in front nothing is stripped.
  EXPECT_EQ(tok->Decode(*no_bos), " Once upon a time");
  EXPECT_EQ(*tok->Encode("", {}), std::vector<int32_t>{1});
  EXPECT_TRUE(tok->IsEndOfGeneration(2));
  EXPECT_FALSE(tok->IsEndOfGeneration(1));
  EXPECT_FALSE(tok->IsEndOfGeneration(-1));
  EXPECT_EQ(tok->PieceToId(" t"), 259);
  EXPECT_EQ(tok->PieceToId("no such piece"), -1);
  EXPECT_EQ(tok->TokenBytes(1), "");              // control: hidden
  EXPECT_EQ(tok->TokenBytes(1, true), "\n<s>\n");  // unless asked for
  EXPECT_EQ(tok->TokenBytes(3 + 0xE4), "\xE4");
  EXPECT_EQ(tok->TokenBytes(-7), "");
  EXPECT_EQ(tok->TokenBytes(512), "");
}

TEST(SpmScores, InvalidUtf8RoundTripsThroughByteFallback) {
  auto tok = Tok512();
  ASSERT_NE(tok, nullptr);
  const std::string text = std::string("a\xFF\xC3 b\x80\xE4\xB8", 8);
  auto ids = tok->Encode(text, {});
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(tok->Decode(*ids), text);
}

// Every Push output must be valid UTF-8, and all of it together the text.
void ExpectStreamsExactly(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::string& want,
                          int* held_back) {
  StreamingDetokenizer d(tok);
  std::string all;
  for (int32_t id : ids) {
    std::string piece = d.Push(id);
    EXPECT_TRUE(utf8::IsValid(piece)) << "invalid UTF-8 emitted mid-stream for id " << id;
    if (piece.empty() && !tok.TokenBytes(id).empty()) ++*held_back;
    all += piece;
  }
  all += d.Flush();
  EXPECT_EQ(all, want);
}

TEST(StreamingDetokenizer, HoldsBackSplitMultiByteCharacters) {
  auto tok = Tok512();
  ASSERT_NE(tok, nullptr);
  const std::string text = "héllo 😀 — 日本";
  auto ids = tok->Encode(text, {});
  ASSERT_TRUE(ids.ok());
  // The test is only meaningful if characters really are split into byte tokens.
  EXPECT_NE(std::find(ids->begin(), ids->end(), 3 + 0xF0), ids->end());  // 😀's lead byte
  int held_back = 0;
  ExpectStreamsExactly(*tok, *ids, text, &held_back);
  EXPECT_GE(held_back, 5);
}

TEST(StreamingDetokenizer, ReplacesInvalidBytes) {
  auto tok = Tok512();
  ASSERT_NE(tok, nullptr);
  const int32_t a = tok->PieceToId("a");
  ASSERT_GE(a, 0);
  auto byte = [](uint8_t b) { return 3 + b; };
  StreamingDetokenizer d(*tok);
  EXPECT_EQ(d.Push(byte(0xE4)), "");  // could still become valid: held
  EXPECT_EQ(d.Push(byte(0xB8)), "");
  EXPECT_EQ(d.Push(a), "\xEF\xBF\xBD" "a");  // "a" proves E4 B8 can never complete
  EXPECT_EQ(d.Push(byte(0xFF)), "\xEF\xBF\xBD");  // never valid: replaced at once
  EXPECT_EQ(d.Push(byte(0xF0)), "");
  EXPECT_EQ(d.Flush(), "\xEF\xBF\xBD");  // truncated at the end
  EXPECT_EQ(d.Flush(), "");
  // The space after BOS is stripped in streaming too.
  StreamingDetokenizer d2(*tok);
  auto ids = tok->Encode("Once", {});
  ASSERT_TRUE(ids.ok());
  std::string s;
  for (int32_t id : *ids) s += d2.Push(id);
  EXPECT_EQ(s + d2.Flush(), "Once");
}

TEST(Utf8, NextSequenceClassifies) {
  using utf8::SeqKind;
  EXPECT_EQ(utf8::NextSequence("a").kind, SeqKind::kComplete);
  EXPECT_EQ(utf8::NextSequence("\xC3\xA9").length, 2u);
  EXPECT_EQ(utf8::NextSequence("\xC3").kind, SeqKind::kIncomplete);
  EXPECT_EQ(utf8::NextSequence("\xC0\x80").kind, SeqKind::kInvalid);      // overlong
  EXPECT_EQ(utf8::NextSequence("\xED\xA0\x80").kind, SeqKind::kInvalid);  // surrogate
  EXPECT_EQ(utf8::NextSequence("\xF4\x90\x80\x80").kind, SeqKind::kInvalid);  // > U+10FFFF
  EXPECT_EQ(utf8::NextSequence("\xF0\x9F\x98\x80").codepoint, 0x1F600u);
  EXPECT_EQ(utf8::Sanitize("a\xE4\xB8" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(utf8::Sanitize("a\xE4\xB8" "b", /*per_byte=*/true), "a\xEF\xBF\xBD\xEF\xBF\xBD" "b");
}

TEST(CreateTokenizer, RejectsBadSpecs) {
  EXPECT_FALSE(CreateTokenizer(VocabSpec{}).ok());  // kNone
  VocabSpec v;
  v.kind = TokenizerKind::kSpmScores;
  v.tokens = {"<unk>", "a"};
  v.scores = {0.f};  // size mismatch
  EXPECT_FALSE(CreateTokenizer(v).ok());
  v.scores = {0.f, 0.f};
  v.bos_id = 7;  // out of range
  EXPECT_FALSE(CreateTokenizer(v).ok());
  v.bos_id = -1;
  EXPECT_TRUE(CreateTokenizer(v).ok());
}

}  // namespace
}  // namespace nibble
