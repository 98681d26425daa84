#include "engine/runtime/stop_strings.h"

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace nibble {
namespace {

bool IsCont(unsigned char c) { return (c & 0xC0) == 0x80; }

// Independent strict UTF-8 validity check (structure only).
bool ValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    size_t len = c < 0x80 ? 1 : c >= 0xF0 && c < 0xF8 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t j = 1; j < len; ++j) {
      if (!IsCont(s[i + j])) return false;
    }
    i += len;
  }
  return true;
}

// Reference on the whole string: scan end positions left to right; the first
// one where a stop string ends (longest if several) decides.
struct Expected {
  std::string text;
  bool stopped = false;
  std::string matched;
};
Expected Naive(const std::string& full, const std::vector<std::string>& stops) {
  for (size_t e = 1; e <= full.size(); ++e) {
    const std::string* best = nullptr;
    for (const std::string& s : stops) {
      if (s.empty() || s.size() > e) continue;
      if (full.compare(e - s.size(), s.size(), s) == 0 && (!best || s.size() > best->size())) {
        best = &s;
      }
    }
    if (best) return {full.substr(0, e - best->size()), true, *best};
  }
  return {full, false, ""};
}

// What must have been emitted after `consumed` bytes of `full` (no stop yet):
// all but the longest suffix that is a proper prefix of a stop string, moved
// back to a code point boundary of the full text.
size_t NaiveEmitted(const std::string& full, size_t consumed,
                    const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& s : stops) {
    for (size_t k = 1; k < s.size() && k <= consumed; ++k) {
      if (full.compare(consumed - k, k, s, 0, k) == 0) hold = std::max(hold, k);
    }
  }
  size_t cut = consumed - hold;
  while (cut > 0 && cut < full.size() && IsCont(full[cut])) --cut;
  return cut;
}

TEST(StopStringsTest, NoStopStringsPassesThrough) {
  StopStringMatcher m({});
  EXPECT_EQ(m.Push("hello ").text, "hello ");
  auto r = m.Push("world");
  EXPECT_EQ(r.text, "world");
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(m.Flush(), "");
  StopStringMatcher empty({"", ""});
  EXPECT_EQ(empty.Push("abc").text, "abc");
  EXPECT_TRUE(empty.stop_strings().empty());
}

TEST(StopStringsTest, StopInOneDelta) {
  StopStringMatcher m({"</s>", "\nUser:"});
  auto r = m.Push("Hello</s>world");
  EXPECT_EQ(r.text, "Hello");
  EXPECT_TRUE(r.stopped);
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.matched(), "</s>");
  r = m.Push("more");
  EXPECT_EQ(r.text, "");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopStringsTest, StopSpanningDeltas) {
  StopStringMatcher m({"</s>"});
  std::vector<std::string> got;
  for (const char* d : {"Hel", "lo<", "/", "s", ">x"}) {
    auto r = m.Push(d);
    got.push_back(r.text);
    if (r.stopped) break;
  }
  EXPECT_EQ(got, (std::vector<std::string>{"Hel", "lo", "", "", ""}));
  EXPECT_TRUE(m.stopped());
}

TEST(StopStringsTest, FalseAlarmIsReleased) {
  StopStringMatcher m({"</s>"});
  EXPECT_EQ(m.Push("a<").text, "a");
  EXPECT_EQ(m.Push("/").text, "");
  EXPECT_EQ(m.Push("b").text, "</b");
  EXPECT_EQ(m.Push("<").text, "");
  EXPECT_EQ(m.Flush(), "<");
  EXPECT_FALSE(m.stopped());
}

TEST(StopStringsTest, OverlappingPrefixes) {
  // "abcabd": after "abcab" the held suffix must be "ab", not the whole thing.
  StopStringMatcher m({"abcabd"});
  EXPECT_EQ(m.Push("abcab").text, "");
  EXPECT_EQ(m.Push("c").text, "abc");  // "abcabc" -> "abc" could still start a match
  auto r = m.Push("abd!");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "");
}

TEST(StopStringsTest, FirstCompletedWinsThenLongest) {
  StopStringMatcher a({"abcd", "bc"});
  auto r = a.Push("abcd");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "a");
  EXPECT_EQ(a.matched(), "bc");
  StopStringMatcher b({"c", "abc"});
  r = b.Push("xabc");
  EXPECT_EQ(r.text, "x");
  EXPECT_EQ(b.matched(), "abc");
}

TEST(StopStringsTest, Utf8NeverSplit) {
  // "é" = C3 A9, "€" = E2 82 AC, "😀" = F0 9F 98 80.
  StopStringMatcher m({"STOP"});
  EXPECT_EQ(m.Push("caf\xC3").text, "caf");
  EXPECT_EQ(m.Push("\xA9 \xE2\x82").text, "\xC3\xA9 ");
  EXPECT_EQ(m.Push("\xAC\xF0\x9F\x98").text, "\xE2\x82\xAC");
  EXPECT_EQ(m.Push("\x80S").text, "\xF0\x9F\x98\x80");
  EXPECT_EQ(m.Flush(), "S");
  // A stop string made of multi-byte characters, split inside a character.
  StopStringMatcher u({"\xE2\x82\xAC\xE2\x82\xAC"});  // "€€"
  EXPECT_EQ(u.Push("1\xE2\x82\xAC").text, "1");
  EXPECT_EQ(u.Push("\xE2").text, "");
  auto r = u.Push("\x82\xAC tail");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "");
  // A truncated sequence at the end of the stream is flushed as is.
  StopStringMatcher t({"x"});
  EXPECT_EQ(t.Push("ab\xE2\x82").text, "ab");
  EXPECT_EQ(t.Flush(), "\xE2\x82");
}

TEST(StopStringsTest, Utf8SafePrefixLength) {
  EXPECT_EQ(Utf8SafePrefixLength(""), 0u);
  EXPECT_EQ(Utf8SafePrefixLength("abc"), 3u);
  EXPECT_EQ(Utf8SafePrefixLength("a\xC3"), 1u);
  EXPECT_EQ(Utf8SafePrefixLength("a\xC3\xA9"), 3u);
  EXPECT_EQ(Utf8SafePrefixLength("a\xF0\x9F\x98"), 1u);
  EXPECT_EQ(Utf8SafePrefixLength("a\xF0\x9F\x98\x80"), 5u);
  EXPECT_EQ(Utf8SafePrefixLength("\x80\x80\x80\x80"), 4u);  // invalid: left alone
  EXPECT_EQ(Utf8SafePrefixLength("\xFF"), 1u);
}

TEST(StopStringsTest, RandomSplitsMatchWholeStringReference) {
  const std::vector<std::string> alphabet = {"a", "b", "c", "\xC3\xA9", "\xE2\x82\xAC",
                                             "\xF0\x9F\x98\x80", "<", "/"};
  std::mt19937_64 rng(20240607);  // only the test's inputs; any generator will do
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  auto random_text = [&](size_t chars) {
    std::string s;
    for (size_t i = 0; i < chars; ++i) {
      s += alphabet[pick(3) == 0 ? pick(alphabet.size()) : pick(3)];  // mostly a/b/c
    }
    return s;
  };
  int stopped_cases = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<std::string> stops;
    const size_t nstops = pick(4);
    for (size_t i = 0; i < nstops; ++i) stops.push_back(random_text(1 + pick(4)));
    const std::string full = random_text(pick(40));
    const Expected want = Naive(full, stops);

    StopStringMatcher m(stops);
    std::string got;
    bool stopped = false;
    size_t consumed = 0;
    while (consumed < full.size() && !stopped) {
      // Split at arbitrary byte positions, including inside code points.
      const size_t len = std::min(full.size() - consumed, pick(7));
      auto r = m.Push(std::string_view(full).substr(consumed, len));
      consumed += len;
      ASSERT_TRUE(ValidUtf8(r.text)) << "iter " << iter;
      got += r.text;
      stopped = r.stopped;
      if (!stopped) {
        ASSERT_EQ(got.size(), NaiveEmitted(full, consumed, stops))
            << "iter " << iter << " consumed " << consumed;
      }
    }
    if (!stopped) got += m.Flush();
    ASSERT_EQ(stopped, want.stopped) << "iter " << iter;
    ASSERT_EQ(got, want.text) << "iter " << iter;
    if (stopped) {
      ASSERT_EQ(m.matched(), want.matched) << "iter " << iter;
      ++stopped_cases;
    }
  }
  EXPECT_GT(stopped_cases, 300);  // the generator exercises both outcomes
  EXPECT_LT(stopped_cases, 2700);
}

}  // namespace
}  // namespace nibble
