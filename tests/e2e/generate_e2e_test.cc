// End-to-end: the nibble-generate binary against llama2.c's published greedy
// output for stories260K (../shared/models/stories260K/reference-greedy.txt,
// produced by upstream run.c: -t 0 -n 256 -i "Once upon a time").
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/runtime/engine.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using testing::RunCommand;
using testing::RunResult;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(GenerateE2E, Stories260KGreedyMatchesLlama2c) {
  const std::string model = testing::Stories260KModel(), tok = testing::Stories260KTokenizer();
  std::string reference = ReadFile(testing::SharedDir() + "/models/stories260K/reference-greedy.txt");
  ASSERT_FALSE(reference.empty());
  // run.c ends its output with one "\n" of its own.
  ASSERT_EQ(reference.back(), '\n');
  reference.pop_back();

  // run.c's 256 steps print 256 tokens after BOS: the prompt's pieces, then the rest.
  auto engine = OpenEngine(model, {.tokenizer_path = tok}, 1);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto ids = engine->tokenizer->Encode("Once upon a time", {.add_bos = true});
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_EQ((*ids)[0], engine->tokenizer->bos_id());
  const int n = 256 - (static_cast<int>(ids->size()) - 1);

  for (int threads : {1, 2}) {
    RunResult r = RunCommand(testing::BinDir() + "/nibble-generate -m " + model + " --tokenizer " + tok +
                      " -p \"Once upon a time\" --temp 0 -t " + std::to_string(threads) + " -n " +
                      std::to_string(n) + " 2>/dev/null");
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_EQ(r.out, reference) << "threads=" << threads;
  }
}

TEST(GenerateE2E, BadInputsFailCleanly) {
  const std::string tok = testing::Stories260KTokenizer();
  // Missing model, missing tokenizer, wrong magic: non-zero exit, message names the path.
  const std::string bogus = testing::WriteTempFile("bogus.bin", std::string(64, 'x'));
  for (const std::string& args :
       {std::string("-m /nonexistent/model.gguf -p hi"),
        "-m " + testing::Stories260KModel() + " --tokenizer /nonexistent/tok.bin -p hi",
        "-m " + bogus + " --tokenizer " + tok + " -p hi"}) {
    RunResult r = RunCommand(testing::BinDir() + "/nibble-generate " + args + " -n 4 2>&1");
    EXPECT_NE(r.exit_code, 0) << args;
    EXPECT_NE(r.out.find("error:"), std::string::npos) << r.out;
    EXPECT_TRUE(r.out.find("/nonexistent/") != std::string::npos || r.out.find(bogus) != std::string::npos)
        << r.out;
  }
  // A tokenizer bigger than the model's vocabulary (Llama 2's 32000 pieces on
  // the 512-token stories260K) is refused at load, naming the tokenizer.
  const std::string sp = testing::SharedDir() + "/models/llama2-tokenizer.model";
  RunResult r = RunCommand(testing::BinDir() + "/nibble-generate -m " + testing::Stories260KModel() +
                           " --tokenizer " + sp + " -p hi -n 4 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find(sp + ": the tokenizer has 32000 tokens but the model's vocabulary is 512"), std::string::npos)
      << r.out;
}

// Truncated copies of real model files, cut at many points, through the CLI:
// every run must end with exit code 1 and an error naming the file (a crash
// would show as a signal, a hang as the ctest timeout).
TEST(GenerateE2E, TruncatedModelFilesFailCleanly) {
  struct Case {
    std::string path, tokenizer_flag;
  };
  std::vector<Case> cases = {{testing::Stories260KModel(), " --tokenizer " + testing::Stories260KTokenizer()}};
  if (auto smol = testing::SmolLM2Gguf()) cases.push_back({*smol, ""});
  const std::string dir = testing::MakeTempDir("nibble_trunc_");
  for (const Case& c : cases) {
    const std::string full = ReadFile(c.path);
    ASSERT_FALSE(full.empty());
    // Dense cuts through the header/metadata region, then spread through the data.
    std::vector<size_t> cuts;
    for (size_t k = 1; k < 4096 && k < full.size(); k = k * 3 / 2 + 1) cuts.push_back(k);
    for (int i = 1; i < 12; ++i) cuts.push_back(full.size() / 12 * i);
    cuts.push_back(full.size() - 1);
    for (size_t cut : cuts) {
      const std::string path = dir + "/cut_" + std::to_string(cut) + ".bin";
      std::ofstream(path, std::ios::binary).write(full.data(), static_cast<std::streamsize>(cut));
      RunResult r = RunCommand(testing::BinDir() + "/nibble-generate -m " + path + c.tokenizer_flag +
                               " -p hi -n 1 2>&1");
      EXPECT_EQ(r.exit_code, 1) << c.path << " cut at " << cut << ": " << r.out;
      EXPECT_NE(r.out.find(path), std::string::npos) << "error should name the file: " << r.out;
      std::remove(path.c_str());
    }
  }
}

}  // namespace
}  // namespace nibble
