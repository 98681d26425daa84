// nibble's native SentencePiece tokenizer (engine/tokenizer/sp_processor.h)
// against the SentencePiece library itself (tests/spm/sp_reference.h), on the
// real Llama 2 tokenizer.model and on models trained here by the library's own
// trainer with every segmentation type we support (Unigram, BPE, CHAR), with
// and without byte fallback, and with the identity, nmt_nfkc and nfkc_cf
// normalisers: ids must agree token for token on a corpus of awkward text.
// Also: the score-BPE tokenizer (kSpmScores) on the Llama 2 vocabulary, and
// corrupt/truncated .model files never crash.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/tokenizer/sentencepiece_vocab.h"
#include "engine/tokenizer/sp_processor.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/spm/sp_reference.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::MakeTempDir;
using ::nibble::testing::SharedDir;
using ::nibble::testing::SourceDir;
using ::nibble::testing::SpReference;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Llama2Model() { return SharedDir() + "/models/llama2-tokenizer.model"; }

// The shared tokenizer corpus plus text aimed at normalisation and unknowns.
std::vector<std::string> Corpus() {
  std::ifstream in(SourceDir() + "/tests/fixtures/tokenize_corpus.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  std::vector<std::string> texts = j["texts"];
  for (const auto& t : j["special_texts"]) texts.push_back(t);
  const char* extra[] = {
      "  leading and trailing  ", "many     inner \t\t spaces\n\nand lines", "\xC2\xA0nbsp\xC2\xA0" "here\xE3\x80\x80ideographic",
      "\xEF\xBC\xA1\xEF\xBC\xA2\xEF\xBC\xA3\xEF\xBC\x91\xEF\xBC\x92\xEF\xBC\x93 fullwidth",  // ＡＢＣ１２３
      "\xEF\xAC\x81nance \xE2\x85\xAB \xE2\x91\xA0 \xE3\x8E\x8F",                          // ﬁ Ⅻ ① ㎏
      "cafe\xCC\x81 vs caf\xC3\xA9", "Z\xCC\x8C\xCC\x8C combining", "\xE2\x80\x8Bzero\xE2\x80\x8Dwidth\xEF\xBB\xBF",
      "emoji \xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", "\xE4\xBD\xA0\xE5\xA5\xBD\xE4\xB8\x96\xE7\x95\x8C CJK",
      "bad \xFF\xFE bytes", "trunc \xE4\xB8", "\xC0\xAF overlong", "\xED\xA0\x80 surrogate", "ctrl \x01\x02\x7F",
      "UPPER lower MiXeD", "numbers 1234567890 3.14159 1e-9", "punct !?.,;:'\"()[]{}<>@#$%^&*_+=~`|\\/",
      "\xE2\x96\x81" "already escaped\xE2\x96\x81", "<s>not special</s><unk>", "tab\tseparated\tvalues",
      "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ", "Ünïcödé Ğğİı ŞşÇç", "\r\nwindows\r\nlines\r\n", "   ", "\n\n\n",
  };
  for (const char* t : extra) texts.push_back(t);
  return texts;
}

// Lines of real text (tinystories + wikitext) for training and checking.
std::string TrainingText() {
  std::string a = ReadAll(SharedDir() + "/data/tinystories-val.txt").substr(0, 150000);
  std::string b = ReadAll(SharedDir() + "/data/wikitext-2-test.txt").substr(0, 150000);
  return a + "\n" + b;
}

std::vector<std::string> CheckLines() {
  std::vector<std::string> lines;
  std::istringstream in(ReadAll(SharedDir() + "/data/wikitext-2-test.txt").substr(200000, 120000));
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

struct TrainedModel {
  std::string name, args;
};
void PrintTo(const TrainedModel& m, std::ostream* os) { *os << m.name; }

class NativeVsLibrary : public ::testing::TestWithParam<TrainedModel> {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(MakeTempDir("sp_native"));
    std::ofstream(*dir_ + "/train.txt", std::ios::binary) << TrainingText();
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string* dir_;
};
std::string* NativeVsLibrary::dir_ = nullptr;

void ExpectSameVocab(const internal::SpProcessor& ours, const SpReference& ref) {
  ASSERT_EQ(ours.size(), ref.size());
  for (int i = 0; i < ref.size(); ++i) {
    ASSERT_EQ(ours.Piece(i), ref.Piece(i)) << i;
    ASSERT_EQ(ours.Score(i), ref.Score(i)) << i;
    ASSERT_EQ(ours.IsControl(i), ref.IsControl(i)) << i;
    ASSERT_EQ(ours.IsUnknown(i), ref.IsUnknown(i)) << i;
    ASSERT_EQ(ours.IsUnused(i), ref.IsUnused(i)) << i;
    ASSERT_EQ(ours.IsByte(i), ref.IsByte(i)) << i;
    ASSERT_EQ(ours.PieceToId(ours.Piece(i)), ref.PieceToId(ref.Piece(i))) << i;
  }
  EXPECT_EQ(ours.bos_id(), ref.bos_id());
  EXPECT_EQ(ours.eos_id(), ref.eos_id());
  EXPECT_EQ(ours.unk_id(), ref.unk_id());
  EXPECT_EQ(ours.pad_id(), ref.pad_id());
}

// Returns the number of texts compared.
int ExpectSameIds(const internal::SpProcessor& ours, const SpReference& ref, const std::vector<std::string>& texts,
                  const std::string& model) {
  int n = 0, failures = 0;
  for (const std::string& t : texts) {
    const std::vector<int> want = ref.Encode(t);
    const std::vector<int> got = ours.Encode(t);
    if (got != want && ++failures <= 5) {
      std::string w, g;
      for (int id : want) w += ref.Piece(id) + "|";
      for (int id : got) g += ours.Piece(id) + "|";
      ADD_FAILURE() << model << ": text \"" << t << "\"\n  library: " << w << "\n  native:  " << g;
    }
    ++n;
  }
  EXPECT_EQ(failures, 0) << model << ": " << failures << " of " << n << " texts differ";
  return n;
}

TEST_P(NativeVsLibrary, TrainedModelTokenForToken) {
  const TrainedModel& m = GetParam();
  const std::string prefix = *dir_ + "/" + m.name;
  std::string error;
  ASSERT_TRUE(::nibble::testing::TrainSentencePiece(
      "--input=" + *dir_ + "/train.txt --model_prefix=" + prefix +
          " --num_threads=2 --minloglevel=2 --max_sentence_length=100000 " + m.args,
      &error))
      << error;
  auto ref = SpReference::Load(prefix + ".model", &error);
  ASSERT_NE(ref, nullptr) << error;
  auto ours = internal::SpProcessor::FromBytes(ReadAll(prefix + ".model"));
  ASSERT_TRUE(ours.ok()) << ours.status();
  ExpectSameVocab(**ours, *ref);
  ExpectSameIds(**ours, *ref, Corpus(), m.name);
  const int n = ExpectSameIds(**ours, *ref, CheckLines(), m.name);
  EXPECT_GT(n, 500);

  // The Tokenizer built from the .model path encodes the same way.
  VocabSpec v;
  v.kind = TokenizerKind::kSentencePieceModel;
  v.sp_model_path = prefix + ".model";
  auto tok = CreateTokenizer(v);
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (const std::string& t : Corpus()) {
    auto ids = (*tok)->Encode(t, {.add_bos = false});
    ASSERT_TRUE(ids.ok());
    const std::vector<int> want = ref->Encode(t);
    EXPECT_EQ(*ids, std::vector<int32_t>(want.begin(), want.end())) << m.name << ": " << t;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Models, NativeVsLibrary,
    ::testing::Values(
        TrainedModel{"unigram_nfkc", "--model_type=unigram --vocab_size=800"},
        TrainedModel{"unigram_cf_bytes", "--model_type=unigram --vocab_size=900 --normalization_rule_name=nfkc_cf "
                                         "--byte_fallback=true --character_coverage=0.995"},
        TrainedModel{"unigram_lowcov", "--model_type=unigram --vocab_size=600 --character_coverage=0.98"},
        TrainedModel{"bpe_identity_bytes", "--model_type=bpe --vocab_size=700 --normalization_rule_name=identity "
                                           "--byte_fallback=true --remove_extra_whitespaces=false"},
        TrainedModel{"bpe_nfkc_lowcov", "--model_type=bpe --vocab_size=600 --character_coverage=0.98"},
        TrainedModel{"bpe_nodummy", "--model_type=bpe --vocab_size=500 --add_dummy_prefix=false"},
        TrainedModel{"char_nfkc", "--model_type=char --character_coverage=0.99"}),
    [](const ::testing::TestParamInfo<TrainedModel>& i) { return i.param.name; });

TEST(NativeVsLibraryLlama2, CorpusAndWikitext) {
  std::string error;
  auto ref = SpReference::Load(Llama2Model(), &error);
  ASSERT_NE(ref, nullptr) << error;
  auto ours = internal::SpProcessor::FromBytes(ReadAll(Llama2Model()));
  ASSERT_TRUE(ours.ok()) << ours.status();
  ExpectSameVocab(**ours, *ref);
  ExpectSameIds(**ours, *ref, Corpus(), "llama2");
  const std::string text = ReadAll(SharedDir() + "/data/wikitext-2-test.txt");
  const std::vector<int> want = ref->Encode(text);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int> got = (*ours)->Encode(text);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(got.size(), want.size());
  EXPECT_TRUE(got == want);
  std::printf("native SentencePiece (Llama 2, BPE): %zu bytes -> %zu tokens in %.3f s\n", text.size(), got.size(),
              secs);
}

// Our score-BPE (kSpmScores) over the same pieces must equal the library too.
TEST(NativeVsLibraryLlama2, ScoreBpeOnTheSameVocabulary) {
  std::string error;
  auto ref = SpReference::Load(Llama2Model(), &error);
  ASSERT_NE(ref, nullptr) << error;
  VocabSpec v;
  ASSERT_TRUE(ReadSentencePieceVocab(Llama2Model(), &v).ok());
  v.kind = TokenizerKind::kSpmScores;
  v.sp_model_path.clear();
  v.sp_model_bytes.clear();
  auto spm = CreateTokenizer(v);
  ASSERT_TRUE(spm.ok()) << spm.status();
  for (const std::string& t : CheckLines()) {
    auto ids = (*spm)->Encode(t, {.add_bos = false});
    ASSERT_TRUE(ids.ok());
    const std::vector<int> want = ref->Encode(t);
    ASSERT_EQ(*ids, std::vector<int32_t>(want.begin(), want.end())) << t;
  }
}

TEST(NativeSentencePiece, CorruptModelsAreErrorsNotCrashes) {
  const std::string good = ReadAll(Llama2Model());
  ASSERT_GT(good.size(), 100000u);
  int rejected = 0;
  for (size_t cut = 0; cut < good.size(); cut += 7919) {
    auto p = internal::SpProcessor::FromBytes(good.substr(0, cut));
    if (!p.ok()) {
      ++rejected;
      EXPECT_FALSE(p.status().message().empty());
    } else {
      (*p)->Encode("still works \xFF");  // a truncated but well-formed prefix must still encode safely
    }
  }
  EXPECT_GT(rejected, 0);
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::string bad = good;
    for (int k = 0; k < 8; ++k) bad[rng() % bad.size()] = static_cast<char>(rng());
    auto p = internal::SpProcessor::FromBytes(bad);
    if (p.ok()) (*p)->Encode("Hello world, \xE4\xBD\xA0\xE5\xA5\xBD");
  }
  auto empty = internal::SpProcessor::FromBytes("");
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("no pieces"), std::string::npos) << empty.status();
  auto junk = internal::SpProcessor::FromBytes("\x0A\xFF\xFF\xFF\xFF\x0F");
  ASSERT_FALSE(junk.ok());
  EXPECT_NE(junk.status().message().find("pieces[0]"), std::string::npos) << junk.status();
}

}  // namespace
}  // namespace nibble
