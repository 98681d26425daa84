// End-to-end: the nibble-batch binary on stories260K.
// References: llama2.c's published greedy output (run.c, independent of our
// code) for "Once upon a time", and nibble-generate (itself checked against
// that reference) for the other prompts, per prompt, greedy and seeded.
// Also: resume after a simulated crash, and bad input lines.
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "engine/runtime/engine.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace nibble {
namespace {

using json = nlohmann::json;
using testing::RunCommand;
using testing::RunResult;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string ModelFlags() {
  return " -m " + testing::Stories260KModel() + " --tokenizer " + testing::Stories260KTokenizer() + " -t 1";
}

// Runs nibble-batch; returns its exit code and stderr+stdout.
RunResult RunBatch(const std::string& in, const std::string& out, const std::string& extra) {
  return RunCommand(testing::BinDir() + "/nibble-batch" + ModelFlags() + " -i " + in + " -o " + out + " " + extra +
                    " 2>&1");
}

// Every output line parsed; fails the test on a line that is not JSON.
std::vector<json> ReadResults(const std::string& path) {
  std::vector<json> lines;
  std::istringstream ss(ReadFile(path));
  for (std::string line; std::getline(ss, line);) {
    json j = json::parse(line, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << line;
    if (!j.is_discarded()) lines.push_back(j);
  }
  return lines;
}

// nibble-generate's generated text (its stdout minus the echoed prompt).
std::string Generate(const std::string& prompt, const std::string& flags) {
  RunResult r = RunCommand(testing::BinDir() + "/nibble-generate" + ModelFlags() + " -p \"" + prompt + "\" " + flags +
                           " 2>/dev/null");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out.substr(0, prompt.size()), prompt);
  return r.out.substr(std::min(prompt.size(), r.out.size()));
}

std::map<std::string, json> ById(const std::vector<json>& lines) {
  std::map<std::string, json> m;
  for (const json& j : lines) {
    if (j.contains("id") && j["id"].is_string() && !j.contains("line")) {
      EXPECT_EQ(m.count(j["id"].get<std::string>()), 0u) << "id written twice: " << j.dump();
      m[j["id"].get<std::string>()] = j;
    }
  }
  return m;
}

TEST(BatchE2E, OutputsMatchReferencesPerPrompt) {
  const std::string dir = testing::MakeTempDir("nibble_batch_");
  // 1) llama2.c's greedy reference: 256 steps after BOS (see generate_e2e_test).
  std::string reference = ReadFile(testing::SharedDir() + "/models/stories260K/reference-greedy.txt");
  ASSERT_FALSE(reference.empty());
  reference.pop_back();  // run.c's own trailing "\n"
  auto engine = OpenEngine(testing::Stories260KModel(), {.tokenizer_path = testing::Stories260KTokenizer()}, 1);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto ids = engine->tokenizer->Encode("Once upon a time", {.add_bos = true});
  ASSERT_TRUE(ids.ok());
  const int ref_n = 256 - (static_cast<int>(ids->size()) - 1);

  const std::vector<std::string> prompts = {"Lily had a", "The dog ran to the", "One day, Tom", "Sam and Sue",
                                            "The sun was"};
  std::string input = json{{"id", "ref"}, {"prompt", "Once upon a time"}, {"max_tokens", ref_n}}.dump() + "\n";
  for (size_t i = 0; i < prompts.size(); ++i) {
    input += json{{"id", "p" + std::to_string(i)}, {"prompt", prompts[i]}}.dump() + "\n";
  }
  // Per-line overrides: a short greedy one and a seeded sampled one.
  input += json{{"id", "short"}, {"prompt", prompts[0]}, {"max_tokens", 7}}.dump() + "\n";
  input += json{{"id", "seeded"}, {"prompt", prompts[1]}, {"temperature", 0.9}, {"seed", 1234}}.dump() + "\n";
  const std::string in = testing::WriteTempFile("batch_in.jsonl", input);
  const std::string out = dir + "/out.jsonl";
  RunResult r = RunBatch(in, out, "--temp 0 -n 48 --max-batch 3");
  ASSERT_EQ(r.exit_code, 0) << r.out;

  auto results = ById(ReadResults(out));
  ASSERT_EQ(results.size(), prompts.size() + 3) << ReadFile(out);
  EXPECT_EQ("Once upon a time" + results["ref"]["text"].get<std::string>(), reference);
  EXPECT_EQ(results["ref"]["usage"]["completion_tokens"], ref_n);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const json& j = results["p" + std::to_string(i)];
    EXPECT_EQ(j["text"].get<std::string>(), Generate(prompts[i], "--temp 0 -n 48")) << prompts[i];
    EXPECT_TRUE(j["finish_reason"] == "length" || j["finish_reason"] == "stop") << j.dump();
    EXPECT_GT(j["usage"]["prompt_tokens"].get<int>(), 1);
    EXPECT_FALSE(j.contains("error")) << j.dump();
  }
  EXPECT_EQ(results["short"]["text"].get<std::string>(), Generate(prompts[0], "--temp 0 -n 7"));
  EXPECT_EQ(results["short"]["finish_reason"], "length");
  EXPECT_EQ(results["short"]["usage"]["completion_tokens"], 7);
  EXPECT_EQ(results["seeded"]["text"].get<std::string>(), Generate(prompts[1], "--temp 0.9 -s 1234 -n 48"));
  EXPECT_NE(results["seeded"]["text"], results["p1"]["text"]);  // the override took effect
}

TEST(BatchE2E, ResumesAfterCrashWithTornLastLine) {
  const std::string dir = testing::MakeTempDir("nibble_batch_resume_");
  std::string input;
  for (const char* id : {"a", "b", "c"}) {
    input += json{{"id", id}, {"prompt", std::string("Lily saw a ") + id}}.dump() + "\n";
  }
  const std::string in = testing::WriteTempFile("resume_in.jsonl", input);
  const std::string out = dir + "/out.jsonl";
  // "a" finished before the crash (a sentinel text proves it is not redone);
  // "b" was being written when the process died.
  {
    std::ofstream f(out, std::ios::binary);
    f << json{{"id", "a"}, {"text", "SENTINEL"}, {"finish_reason", "length"}}.dump() << "\n";
    f << R"({"id": "b", "text": "Lily saw a b and th)";
  }
  RunResult r = RunBatch(in, out, "--temp 0 -n 24 --max-batch 2");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("truncated"), std::string::npos) << r.out;
  std::vector<json> lines = ReadResults(out);
  auto results = ById(lines);
  ASSERT_EQ(lines.size(), 3u) << ReadFile(out);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results["a"]["text"], "SENTINEL");
  EXPECT_EQ(results["b"]["text"].get<std::string>(), Generate("Lily saw a b", "--temp 0 -n 24"));
  EXPECT_EQ(results["c"]["text"].get<std::string>(), Generate("Lily saw a c", "--temp 0 -n 24"));
  // A second run has nothing left to do and appends nothing.
  const std::string before = ReadFile(out);
  r = RunBatch(in, out, "--temp 0 -n 24");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(ReadFile(out), before);
}

TEST(BatchE2E, BadLinesAreReportedAndTheRestRuns) {
  const std::string dir = testing::MakeTempDir("nibble_batch_bad_");
  const std::string input =
      R"({"id": "x", "prompt": "The cat"})" "\n"                      // 1 ok
      R"({"id": "y", "prompt": )" "\n"                                 // 2 malformed JSON
      R"({"id": "z"})" "\n"                                            // 3 no prompt
      R"({"prompt": "no id"})" "\n"                                    // 4 no id
      R"({"id": "x", "prompt": "again"})" "\n"                         // 5 duplicate id
      R"({"id": "v", "prompt": "A", "max_tokens": "ten"})" "\n"        // 6 bad field type
      R"({"id": "u", "prompt": "A", "temperature": -3})" "\n"          // 7 bad value
      "\n"                                                             // 8 blank: ignored
      R"({"id": "w", "messages": [{"role": "user", "content": "Hi"}]})" "\n";  // 9 ok (chat)
  const std::string in = testing::WriteTempFile("bad_in.jsonl", input);
  const std::string out = dir + "/out.jsonl";
  RunResult r = RunBatch(in, out, "--temp 0 -n 16");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  std::vector<json> lines = ReadResults(out);
  std::map<int, json> errors;
  for (const json& j : lines) {
    if (j.contains("line")) errors[j["line"].get<int>()] = j;
  }
  EXPECT_EQ(errors.size(), 6u) << ReadFile(out);
  for (int n : {2, 3, 4, 5, 6, 7}) {
    ASSERT_TRUE(errors.count(n)) << "line " << n << ": " << ReadFile(out);
    EXPECT_TRUE(errors[n]["error"].is_string() && !errors[n]["error"].get<std::string>().empty());
    // The message on stderr names the input file and the line.
    EXPECT_NE(r.out.find(in + " line " + std::to_string(n) + ":"), std::string::npos) << r.out;
  }
  EXPECT_TRUE(errors[4]["id"].is_null());
  EXPECT_EQ(errors[5]["id"], "x");
  EXPECT_NE(errors[5]["error"].get<std::string>().find("duplicate"), std::string::npos);
  EXPECT_NE(errors[6]["error"].get<std::string>().find("max_tokens"), std::string::npos);
  EXPECT_NE(errors[7]["error"].get<std::string>().find("temperature"), std::string::npos);
  auto results = ById(lines);
  ASSERT_EQ(results.size(), 2u) << ReadFile(out);
  EXPECT_EQ(results["x"]["text"].get<std::string>(), Generate("The cat", "--temp 0 -n 16"));
  EXPECT_FALSE(results["w"]["text"].get<std::string>().empty());
  EXPECT_GT(results["w"]["usage"]["prompt_tokens"].get<int>(), 3);  // the chat template was applied
  // Resuming reports nothing twice.
  const std::string before = ReadFile(out);
  r = RunBatch(in, out, "--temp 0 -n 16");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(ReadFile(out), before);
}

TEST(BatchE2E, MissingFilesFailCleanly) {
  const std::string dir = testing::MakeTempDir("nibble_batch_missing_");
  RunResult r = RunBatch("/nonexistent/in.jsonl", dir + "/out.jsonl", "");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("/nonexistent/in.jsonl"), std::string::npos) << r.out;
  const std::string in = testing::WriteTempFile("ok_in.jsonl", R"({"id": "a", "prompt": "x"})" "\n");
  r = RunCommand(testing::BinDir() + "/nibble-batch -m /nonexistent/model.bin -i " + in + " -o " + dir +
                 "/o.jsonl 2>&1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("/nonexistent/model.bin"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace nibble
