// Chat templates: messages -> prompt text, for the template families we know.
//
// Goals: turn an OpenAI-style message list into the exact prompt text a model
// was trained on, for the common template families, without a Jinja engine:
// the family is recognised from the GGUF's Jinja source
// (tokenizer.chat_template) and rendered natively; the few per-model details a
// family's templates vary in (e.g. SmolLM2's default system message) are read
// from the source's string literals.
// Non-goals: arbitrary Jinja, tools/function calling, multimodal content.
//
// Families (each rendering follows the family's reference template; the
// examples are for [system S, user U, assistant A, user V] + generation prompt):
//   chatml   <|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n...
//            <|im_start|>assistant\n. Variant (SmolLM2, Qwen2): if the source
//            has a string literal "<|im_start|>system...<|im_end|>...", that
//            literal is emitted before the first message when it is not a system
//            message (and there is one).
//   llama2   [INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s><s>[INST] V [/INST]
//            (contents strip()ped; roles must alternate user/assistant after an
//            optional leading system message, as the template demands).
//   llama3   <|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>...
//            <|start_header_id|>assistant<|end_header_id|>\n\n (contents trimmed).
//            Llama 3.1+ sources ("Cutting Knowledge Date") always open with a
//            system block "Cutting Knowledge Date: ...\nToday Date: D\n\n" + S.
//   zephyr   <|system|>\nS</s>\n<|user|>\nU</s>\n...<|assistant|>\n
//   gemma    <start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA...
//            <start_of_turn>model\n (system folded into the first user turn, as
//            Gemma 3's template and Google's docs do; user/model must alternate).
//   phi3     <|system|>\nS<|end|>\n<|user|>\nU<|end|>\n...<|assistant|>\n
//            (+ eos when !add_generation_prompt and the source says so).
// Conventions: the BOS token a template puts at the very start is NOT emitted
// (tokenise with the vocabulary's add-BOS rule and special-token parsing on);
// BOS/EOS a template puts elsewhere are emitted as text (ChatTemplateTokens).
// strip()/trim remove Python's whitespace set (ASCII and Unicode).
//
// Thread safety: stateless functions; safe to call concurrently.
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace nibble {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

enum class ChatTemplateFamily { kUnknown, kChatML, kLlama2, kLlama3, kZephyr, kGemma, kPhi3 };

// Texts of the special tokens some templates place mid-conversation, and the
// date for Llama 3.1+. Empty fields take the family's usual value: "<s>"/"</s>"
// for llama2 and zephyr, "<|endoftext|>" for phi3; for the date, today's
// ("%d %b %Y", UTC) if the template calls strftime_now, else its own default.
struct ChatTemplateTokens {
  std::string bos;
  std::string eos;
  std::string date_string;
};

// Recognises the family of a Jinja chat template; kUnknown if none (or empty).
ChatTemplateFamily DetectChatTemplateFamily(std::string_view template_source);

// Short name for logs: "chatml", "chatml+default-system", "llama2", "llama3",
// "llama3.1", "zephyr", "gemma", "phi3", or "unknown" (also for "").
std::string ChatTemplateFamilyName(std::string_view template_source);

// Renders `messages` with the template's family. An empty or unrecognised
// template falls back to ChatML and sets *warning to say so; otherwise
// *warning is cleared (warning may be null). Errors: INVALID_ARGUMENT for a
// role other than system/user/assistant (naming it and the message index) or a
// role order the family's template rejects.
absl::StatusOr<std::string> ApplyChatTemplate(std::string_view template_source,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt, std::string* warning);
absl::StatusOr<std::string> ApplyChatTemplate(std::string_view template_source,
                                              std::span<const ChatMessage> messages,
                                              bool add_generation_prompt,
                                              const ChatTemplateTokens& tokens,
                                              std::string* warning);

}  // namespace nibble
