#include "tests/test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace nibble::testing {
namespace fs = std::filesystem;

static std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string SourceDir() {
  std::string s = Env("NIBBLE_SOURCE_DIR");
  return s.empty() ? fs::current_path().string() : s;
}

std::string SharedDir() {
  std::string s = Env("NIBBLE_SHARED_DIR");
  return s.empty() ? (fs::path(SourceDir()) / ".." / "shared").lexically_normal().string() : s;
}

std::string Stories260KModel() { return SharedDir() + "/models/stories260K/stories260K.bin"; }
std::string Stories260KTokenizer() { return SharedDir() + "/models/stories260K/tok512.bin"; }

std::optional<std::string> SmolLM2Gguf() {
  std::string p = Env("NIBBLE_SMOLLM2");
  if (p.empty()) p = SourceDir() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (fs::exists(p)) return p;
  return std::nullopt;
}

std::string BinDir() {
  std::string s = Env("NIBBLE_BIN_DIR");
  return s.empty() ? SourceDir() + "/build/bin" : s;
}

std::string MakeTempDir(const std::string& prefix) {
  std::string tmpl = (fs::temp_directory_path() / (prefix + "XXXXXX")).string();
  char* d = ::mkdtemp(tmpl.data());
  return d ? std::string(d) : std::string();
}

std::string WriteTempFile(const std::string& name, const std::string& content) {
  std::string dir = MakeTempDir("nibble_test_");
  std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

RunResult RunCommand(const std::string& cmd) {
  RunResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int st = pclose(p);
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace nibble::testing
