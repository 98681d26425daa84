// Incremental stop-string matcher for streamed (detokenised) text.
//
// Goals: feed text deltas as they are generated; get back, right away, all the
// text that can no longer turn out to be part of a stop string; learn when a
// stop string appears (possibly spread over many deltas) and get exactly the
// text before it. Never returns a partial UTF-8 code point from Push().
// Non-goals: regexes, token-id stop sequences (the caller checks EOG ids),
// case-insensitive matching.
//
// Semantics (independent of how the text is split into deltas): the stream
// stops at the first byte position where some stop string ends; if several end
// there the longest wins. Everything before that stop string's first byte is
// returned, the stop string and anything after it are not. Example: stops
// {"bc", "abcd"} on "abcd" stop after "abc" with "a" returned, since "bc"
// completes first (the generator need not run on to see whether "abcd" would).
//
// Held-back text: after each Push the longest suffix that is a proper prefix of
// some stop string is held back, plus any trailing incomplete UTF-8 sequence;
// so at most (longest stop string - 1) + 3 bytes are held.
//
// Thread safety: per-stream mutable state; not thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace nibble {

class StopStringMatcher {
 public:
  struct Result {
    std::string text;      // safe to emit now (maybe empty)
    bool stopped = false;  // a stop string was hit; `text` ends right before it
  };

  // Empty stop strings are ignored. For the no-split guarantee the stop
  // strings should be valid UTF-8 (as is any text a client can send as JSON).
  explicit StopStringMatcher(std::vector<std::string> stop_strings);

  // Appends `delta` to the stream. After a stop, returns {"", true} forever.
  Result Push(std::string_view delta);

  // End of stream: returns the held-back text (a prefix of some stop string
  // and/or an incomplete UTF-8 sequence, returned as is). "" after a stop.
  std::string Flush();

  bool stopped() const { return stopped_; }
  // The stop string that was hit; empty if none.
  const std::string& matched() const { return matched_; }
  const std::vector<std::string>& stop_strings() const { return stops_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  std::string matched_;
  bool stopped_ = false;
};

// Length of the longest prefix of `s` that does not end inside a UTF-8
// multi-byte sequence (a truncated trailing sequence is cut off; invalid
// bytes are left alone). Exposed for tests and streaming code.
size_t Utf8SafePrefixLength(std::string_view s);

}  // namespace nibble
