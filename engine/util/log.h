// Minimal leveled logging to stderr for the engine (Debian's abseil 20220623
// predates absl/log). Usage: NIBBLE_LOG(WARNING) << "text " << value;
// Thread safety: each statement is written with one fwrite.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace nibble::log_internal {

enum class Level { kINFO = 0, kWARNING = 1, kERROR = 2 };

// NIBBLE_LOG_LEVEL=0|1|2 sets the minimum level printed (default: WARNING).
inline Level MinLevel() {
  static const Level level = [] {
    const char* e = std::getenv("NIBBLE_LOG_LEVEL");
    return e ? static_cast<Level>(std::atoi(e)) : Level::kWARNING;
  }();
  return level;
}

class Message {
 public:
  Message(Level level, const char* file, int line) : level_(level) {
    static const char* kNames[] = {"I", "W", "E"};
    const char* base = file;
    for (const char* p = file; *p; ++p)
      if (*p == '/') base = p + 1;
    ss_ << kNames[static_cast<int>(level)] << " " << base << ":" << line << "] ";
  }
  ~Message() {
    if (level_ < MinLevel()) return;
    ss_ << '\n';
    const std::string s = ss_.str();
    std::fwrite(s.data(), 1, s.size(), stderr);
  }
  std::ostream& stream() { return ss_; }

 private:
  Level level_;
  std::ostringstream ss_;
};

}  // namespace nibble::log_internal

#define NIBBLE_LOG(level) \
  ::nibble::log_internal::Message(::nibble::log_internal::Level::k##level, __FILE__, __LINE__).stream()
