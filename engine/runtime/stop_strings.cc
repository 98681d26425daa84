#include "engine/runtime/stop_strings.h"

#include <algorithm>
#include <utility>

namespace nibble {

size_t Utf8SafePrefixLength(std::string_view s) {
  const size_t n = s.size();
  // Find the last non-continuation byte among the final 3; a sequence needs at
  // most 3 bytes after its lead, so anything earlier is complete.
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;
    size_t need = 1;
    if ((c & 0xE0) == 0xC0) {
      need = 2;
    } else if ((c & 0xF0) == 0xE0) {
      need = 3;
    } else if ((c & 0xF8) == 0xF0) {
      need = 4;
    }
    return back < need ? n - back : n;
  }
  return n;
}

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings) {
  for (std::string& s : stop_strings) {
    if (!s.empty()) stops_.push_back(std::move(s));
  }
}

StopStringMatcher::Result StopStringMatcher::Push(std::string_view delta) {
  Result r;
  if (stopped_) {
    r.stopped = true;
    return r;
  }
  const size_t old_size = held_.size();
  held_.append(delta);
  const std::string_view buf(held_);

  // First end position of any stop string; ties -> longest. A match lying
  // wholly inside the previously held text would have been found before.
  size_t best_end = std::string_view::npos;
  const std::string* best = nullptr;
  for (const std::string& s : stops_) {
    const size_t from = old_size >= s.size() ? old_size - s.size() + 1 : 0;
    const size_t pos = buf.find(s, from);
    if (pos == std::string_view::npos) continue;
    const size_t end = pos + s.size();
    if (end < best_end || (end == best_end && s.size() > best->size())) {
      best_end = end;
      best = &s;
    }
  }
  if (best != nullptr) {
    r.text.assign(buf.substr(0, best_end - best->size()));
    r.stopped = true;
    matched_ = *best;
    stopped_ = true;
    held_.clear();
    return r;
  }

  // Hold back the longest suffix that could still grow into a stop string.
  size_t hold = 0;
  for (const std::string& s : stops_) {
    for (size_t k = std::min(s.size() - 1, buf.size()); k > hold; --k) {
      if (buf.substr(buf.size() - k) == std::string_view(s).substr(0, k)) {
        hold = k;
        break;
      }
    }
  }
  const size_t emit = Utf8SafePrefixLength(buf.substr(0, buf.size() - hold));
  r.text.assign(buf.substr(0, emit));
  held_.erase(0, emit);
  return r;
}

std::string StopStringMatcher::Flush() {
  std::string out;
  out.swap(held_);
  return out;
}

}  // namespace nibble
