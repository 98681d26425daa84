#include "engine/runtime/chat_template.h"

#include <cstdint>
#include <initializer_list>
#include <ctime>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace nibble {
namespace {

// ---------------------------------------------------------------------------
// Reading the Jinja source.

// Decodes the body of a Jinja (Python-style) string literal.
std::string DecodeJinjaEscapes(std::string_view body) {
  std::string out;
  out.reserve(body.size());
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 == body.size()) {
      out.push_back(body[i]);
      continue;
    }
    const char e = body[++i];
    switch (e) {
      case 'n': out.push_back('\n'); break;
      case 't': out.push_back('\t'); break;
      case 'r': out.push_back('\r'); break;
      case '\\': out.push_back('\\'); break;
      case '\'': out.push_back('\''); break;
      case '"': out.push_back('"'); break;
      default:  // unknown escapes stay as written, as in Python
        out.push_back('\\');
        out.push_back(e);
    }
  }
  return out;
}

// The string literals inside {{ }} and {% %} blocks, decoded, in order.
// Text outside blocks and {# comments #} are skipped. Unterminated constructs
// end the scan (the source is untrusted; this never reads out of bounds).
std::vector<std::string> JinjaStringLiterals(std::string_view src) {
  std::vector<std::string> out;
  size_t i = 0;
  const size_t n = src.size();
  while (i + 1 < n) {
    const std::string_view two = src.substr(i, 2);
    if (two == "{#") {
      const size_t end = src.find("#}", i + 2);
      if (end == std::string_view::npos) break;
      i = end + 2;
      continue;
    }
    if (two != "{{" && two != "{%") {
      ++i;
      continue;
    }
    i += 2;
    while (i < n) {
      const char c = src[i];
      if (c == '\'' || c == '"') {
        size_t j = i + 1;
        while (j < n && src[j] != c) j += src[j] == '\\' ? 2 : 1;
        if (j >= n) return out;
        out.push_back(DecodeJinjaEscapes(src.substr(i + 1, j - i - 1)));
        i = j + 1;
        continue;
      }
      if (i + 1 < n && src[i + 1] == '}' && (c == '}' || c == '%')) {
        i += 2;
        break;
      }
      ++i;
    }
  }
  return out;
}

bool LooksLikeDate(std::string_view s) {  // "26 Jul 2024"
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  if (s.size() != 11 && s.size() != 10) return false;
  const size_t d = s.size() - 9;  // day digits
  for (size_t i = 0; i < d; ++i) {
    if (!digit(s[i])) return false;
  }
  return s[d] == ' ' && s[d + 1] >= 'A' && s[d + 1] <= 'Z' && s[d + 4] == ' ' && digit(s[d + 5]) &&
         digit(s[d + 6]) && digit(s[d + 7]) && digit(s[d + 8]);
}

struct Detected {
  ChatTemplateFamily family = ChatTemplateFamily::kUnknown;
  std::string default_system_block;  // chatml: literal emitted when messages[0] isn't system
  bool dated_system = false;         // llama3.1+: always-present system header
  std::string knowledge_line;        // "Cutting Knowledge Date: December 2023\n"
  std::string today_prefix = "Today Date: ";
  std::string default_date = "26 Jul 2024";
  bool uses_strftime = false;
  bool eos_without_generation_prompt = false;  // phi3
  bool skip_empty_system = false;              // phi3.5
};

Detected Detect(std::string_view src) {
  Detected d;
  if (src.empty()) return d;
  auto contains = [&](std::string_view needle) { return src.find(needle) != src.npos; };
  // Phi-4 puts <|im_sep|> between role and content: not plain ChatML.
  if (contains("<|im_start|>") && !contains("<|im_sep|>")) {
    d.family = ChatTemplateFamily::kChatML;
    for (const std::string& lit : JinjaStringLiterals(src)) {
      if (lit.starts_with("<|im_start|>system") && lit.find("<|im_end|>") != lit.npos) {
        d.default_system_block = lit;
        break;
      }
    }
  } else if (contains("<|start_header_id|>") && contains("<|eot_id|>")) {
    d.family = ChatTemplateFamily::kLlama3;
    if (contains("Cutting Knowledge Date")) {
      d.dated_system = true;
      d.uses_strftime = contains("strftime_now");
      for (const std::string& lit : JinjaStringLiterals(src)) {
        if (lit.starts_with("Cutting Knowledge Date") && d.knowledge_line.empty()) {
          d.knowledge_line = lit;
        } else if (lit.starts_with("Today Date")) {
          d.today_prefix = lit;
        } else if (LooksLikeDate(lit)) {
          d.default_date = lit;
        }
      }
      if (d.knowledge_line.empty()) d.knowledge_line = "Cutting Knowledge Date: December 2023\n";
    }
  } else if (contains("<start_of_turn>")) {
    d.family = ChatTemplateFamily::kGemma;
  } else if (contains("<|user|>") && contains("<|end|>")) {
    d.family = ChatTemplateFamily::kPhi3;
    d.eos_without_generation_prompt = contains("eos_token");
    d.skip_empty_system = contains("'system' and message['content']") ||
                          contains("\"system\" and message[\"content\"]");
  } else if (contains("<|user|>")) {
    d.family = ChatTemplateFamily::kZephyr;
  } else if (contains("[INST]") && contains("<<SYS>>")) {
    d.family = ChatTemplateFamily::kLlama2;
  }
  return d;
}

// ---------------------------------------------------------------------------
// Rendering helpers.

// Python str.isspace() code points.
bool IsPyWhitespace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Decodes the (well-formed) code point at s[i]; returns its length, 0 if the
// bytes there are not a well-formed sequence.
size_t DecodeAt(std::string_view s, size_t i, uint32_t* cp) {
  const unsigned char c = s[i];
  size_t len = 0;
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  if ((c & 0xE0) == 0xC0) {
    len = 2;
    *cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3;
    *cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4;
    *cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (size_t k = 1; k < len; ++k) {
    const unsigned char cc = s[i + k];
    if ((cc & 0xC0) != 0x80) return 0;
    *cp = (*cp << 6) | (cc & 0x3F);
  }
  return len;
}

// Jinja's |trim and Python's str.strip() with no argument.
std::string_view PyStrip(std::string_view s) {
  size_t b = 0;
  while (b < s.size()) {
    uint32_t cp;
    const size_t len = DecodeAt(s, b, &cp);
    if (len == 0 || !IsPyWhitespace(cp)) break;
    b += len;
  }
  size_t e = s.size();
  while (e > b) {
    size_t start = e - 1;
    while (start > b && e - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) {
      --start;
    }
    uint32_t cp;
    const size_t len = DecodeAt(s, start, &cp);
    if (len != e - start || !IsPyWhitespace(cp)) break;
    e = start;
  }
  return s.substr(b, e - b);
}

std::string TodayUtc() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  const size_t n = std::strftime(buf, sizeof(buf), "%d %b %Y", &tm);
  return std::string(buf, n);
}

// Appends pieces (absl::StrAppend does not take std::string_view in every
// absl build, so this stays on the standard types).
void Cat(std::string* out, std::initializer_list<std::string_view> pieces) {
  for (std::string_view p : pieces) out->append(p);
}

std::string Or(const std::string& v, std::string_view fallback) {
  return v.empty() ? std::string(fallback) : v;
}

absl::Status AlternationError(std::string_view family, size_t index, const std::string& role) {
  return absl::InvalidArgumentError(absl::StrCat(
      std::string(family), " chat template: message ", index, " has role \"", role,
      "\", but roles must alternate user/assistant/user/... after an optional first system "
      "message"));
}

std::string RenderChatML(const Detected& d, std::span<const ChatMessage> msgs, bool gen) {
  std::string out;
  if (!msgs.empty() && msgs[0].role != "system") out += d.default_system_block;
  for (const ChatMessage& m : msgs) {
    Cat(&out, {"<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n"});
  }
  if (gen) out += "<|im_start|>assistant\n";
  return out;
}

absl::StatusOr<std::string> RenderLlama2(std::span<const ChatMessage> msgs,
                                         const ChatTemplateTokens& tok) {
  const std::string bos = Or(tok.bos, "<s>"), eos = Or(tok.eos, "</s>");
  std::string_view system;
  bool has_system = false;
  size_t first = 0;
  if (!msgs.empty() && msgs[0].role == "system") {
    system = msgs[0].content;
    has_system = true;
    first = 1;
  }
  std::string out;
  for (size_t i = first; i < msgs.size(); ++i) {
    const size_t turn = i - first;
    const ChatMessage& m = msgs[i];
    if ((m.role == "user") != (turn % 2 == 0)) return AlternationError("llama2", i, m.role);
    std::string content = m.content;
    if (turn == 0 && has_system) {
      content.clear();
      Cat(&content, {"<<SYS>>\n", system, "\n<</SYS>>\n\n", m.content});
    }
    if (m.role == "user") {
      Cat(&out, {turn == 0 ? "" : bos, "[INST] ", PyStrip(content), " [/INST]"});
    } else {
      Cat(&out, {" ", PyStrip(content), " ", eos});
    }
  }
  return out;
}

std::string RenderLlama3(const Detected& d, std::span<const ChatMessage> msgs, bool gen,
                         const ChatTemplateTokens& tok) {
  std::string out;
  size_t first = 0;
  if (d.dated_system) {
    std::string_view system;
    if (!msgs.empty() && msgs[0].role == "system") {
      system = PyStrip(msgs[0].content);
      first = 1;
    }
    const std::string date =
        !tok.date_string.empty() ? tok.date_string : d.uses_strftime ? TodayUtc() : d.default_date;
    Cat(&out, {"<|start_header_id|>system<|end_header_id|>\n\n", d.knowledge_line,
               d.today_prefix, date, "\n\n", system, "<|eot_id|>"});
  }
  for (size_t i = first; i < msgs.size(); ++i) {
    Cat(&out, {"<|start_header_id|>", msgs[i].role, "<|end_header_id|>\n\n",
               PyStrip(msgs[i].content), "<|eot_id|>"});
  }
  if (gen) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

std::string RenderZephyr(std::span<const ChatMessage> msgs, bool gen,
                         const ChatTemplateTokens& tok) {
  const std::string eos = Or(tok.eos, "</s>");
  std::string out;
  for (const ChatMessage& m : msgs) {
    Cat(&out, {"<|", m.role, "|>\n", m.content, eos, "\n"});
  }
  // The reference template emits the prompt inside its message loop, so an
  // empty conversation gets none.
  if (gen && !msgs.empty()) out += "<|assistant|>\n";
  return out;
}

absl::StatusOr<std::string> RenderGemma(std::span<const ChatMessage> msgs, bool gen) {
  std::string prefix;
  size_t first = 0;
  if (!msgs.empty() && msgs[0].role == "system") {
    prefix = msgs[0].content + "\n\n";
    first = 1;
  }
  std::string out;
  for (size_t i = first; i < msgs.size(); ++i) {
    const size_t turn = i - first;
    const ChatMessage& m = msgs[i];
    if ((m.role == "user") != (turn % 2 == 0)) return AlternationError("gemma", i, m.role);
    Cat(&out, {"<start_of_turn>", m.role == "assistant" ? "model" : m.role, "\n",
               turn == 0 ? prefix : "", PyStrip(m.content), "<end_of_turn>\n"});
  }
  if (gen) out += "<start_of_turn>model\n";
  return out;
}

std::string RenderPhi3(const Detected& d, std::span<const ChatMessage> msgs, bool gen,
                       const ChatTemplateTokens& tok) {
  std::string out;
  for (const ChatMessage& m : msgs) {
    if (d.skip_empty_system && m.role == "system" && m.content.empty()) continue;
    Cat(&out, {"<|", m.role, "|>\n", m.content, "<|end|>\n"});
  }
  if (gen) {
    out += "<|assistant|>\n";
  } else if (d.eos_without_generation_prompt) {
    out += Or(tok.eos, "<|endoftext|>");
  }
  return out;
}

}  // namespace

ChatTemplateFamily DetectChatTemplateFamily(std::string_view template_source) {
  return Detect(template_source).family;
}

std::string ChatTemplateFamilyName(std::string_view template_source) {
  const Detected d = Detect(template_source);
  switch (d.family) {
    case ChatTemplateFamily::kChatML:
      return d.default_system_block.empty() ? "chatml" : "chatml+default-system";
    case ChatTemplateFamily::kLlama2: return "llama2";
    case ChatTemplateFamily::kLlama3: return d.dated_system ? "llama3.1" : "llama3";
    case ChatTemplateFamily::kZephyr: return "zephyr";
    case ChatTemplateFamily::kGemma: return "gemma";
    case ChatTemplateFamily::kPhi3: return "phi3";
    case ChatTemplateFamily::kUnknown: break;
  }
  return "unknown";
}

absl::StatusOr<std::string> ApplyChatTemplate(std::string_view template_source,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt, std::string* warning) {
  return ApplyChatTemplate(template_source, messages, add_generation_prompt, ChatTemplateTokens{},
                           warning);
}

absl::StatusOr<std::string> ApplyChatTemplate(std::string_view template_source,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt,
                                              const ChatTemplateTokens& tokens,
                                              std::string* warning) {
  if (warning != nullptr) warning->clear();
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(
          absl::StrCat("chat message ", i, " has unsupported role \"", role,
                       "\" (supported: system, user, assistant)"));
    }
  }
  Detected d = Detect(template_source);
  if (d.family == ChatTemplateFamily::kUnknown) {
    if (warning != nullptr) {
      *warning = template_source.empty()
                     ? "the model has no chat template; using ChatML"
                     : "the model's chat template is not one of the known families "
                       "(chatml, llama2, llama3, zephyr, gemma, phi3); using ChatML";
    }
    d = Detected{};
    d.family = ChatTemplateFamily::kChatML;
  }
  switch (d.family) {
    case ChatTemplateFamily::kLlama2: return RenderLlama2(messages, tokens);
    case ChatTemplateFamily::kLlama3:
      return RenderLlama3(d, messages, add_generation_prompt, tokens);
    case ChatTemplateFamily::kZephyr: return RenderZephyr(messages, add_generation_prompt, tokens);
    case ChatTemplateFamily::kGemma: return RenderGemma(messages, add_generation_prompt);
    case ChatTemplateFamily::kPhi3: return RenderPhi3(d, messages, add_generation_prompt, tokens);
    case ChatTemplateFamily::kChatML:
    case ChatTemplateFamily::kUnknown: break;
  }
  return RenderChatML(d, messages, add_generation_prompt);
}

}  // namespace nibble
