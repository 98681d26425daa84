// Helpers shared by tests: locating the repo, ../shared and optional models.
#pragma once

#include <optional>
#include <string>

namespace nibble::testing {

// Project source root (NIBBLE_SOURCE_DIR, else the current directory).
std::string SourceDir();
// ../shared beside the checkout (NIBBLE_SHARED_DIR overrides).
std::string SharedDir();
std::string Stories260KModel();      // shared/models/stories260K/stories260K.bin
std::string Stories260KTokenizer();  // shared/models/stories260K/tok512.bin
// SmolLM2-135M-Instruct Q4_1 GGUF as fetched by scripts/get-models.sh
// (NIBBLE_SMOLLM2 overrides). std::nullopt if it is not there.
std::optional<std::string> SmolLM2Gguf();
// Directory of built executables (NIBBLE_BIN_DIR).
std::string BinDir();
// Writes `content` to a fresh temporary file and returns its path.
std::string WriteTempFile(const std::string& name, const std::string& content);
// A fresh temporary directory.
std::string MakeTempDir(const std::string& prefix);

// Runs a shell command; returns its exit code (-1 if it did not exit normally,
// e.g. killed by a signal) and everything it wrote to stdout.
struct RunResult {
  int exit_code = -1;
  std::string out;
};
RunResult RunCommand(const std::string& cmd);

}  // namespace nibble::testing
