#include "engine/runtime/chat_template.h"

#include <ctime>
#include <string>
#include <vector>

#include "gtest/gtest.h"

// Expected strings below are written by hand from each family's documented
// prompt format. They were also cross-checked (outside this test) by rendering
// the same template sources with Python jinja2 using Hugging Face's settings
// (trim_blocks, lstrip_blocks), minus the leading BOS (see chat_template.h).

namespace nibble {
namespace {

// SmolLM2-135M-Instruct's tokenizer.chat_template as stored in its GGUF:
// real newlines inside the quoted strings.
const std::string kSmolLM2 =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}";

// Qwen2-style: the same shape with Jinja escape sequences instead.
const std::string kQwen2 =
    R"({% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %})";

const std::string kChatML =
    R"({% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %})";

// meta-llama/Llama-2-7b-chat-hf.
const std::string kLlama2 =
    R"({% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %})";

// meta-llama/Meta-Llama-3-8B-Instruct.
const std::string kLlama3 =
    R"({% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}{% endif %})";

// Llama 3.2 Instruct (system-message part; the tool branches are inert
// without tools).
const std::string kLlama32 = R"({{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %})";

// HuggingFaceH4/zephyr-7b-beta.
const std::string kZephyr =
    R"({% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %})";

// google/gemma-2-2b-it.
const std::string kGemma =
    R"({{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '
' + message['content'] | trim + '<end_of_turn>
' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model
'}}{% endif %})";

// microsoft/Phi-3-mini-4k-instruct.
const std::string kPhi3 =
    R"({% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>
' + message['content'] + '<|end|>
'}}{% elif message['role'] == 'user' %}{{'<|user|>
' + message['content'] + '<|end|>
'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>
' + message['content'] + '<|end|>
'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>
' }}{% else %}{{ eos_token }}{% endif %})";

const std::vector<ChatMessage> kConv = {{"system", "You are terse."},
                                        {"user", "Hello!"},
                                        {"assistant", "Hi."},
                                        {"user", "What is 2+2?"}};
const std::vector<ChatMessage> kNoSystem = {{"user", "Hello!"}, {"assistant", "Hi."},
                                            {"user", "What is 2+2?"}};

std::string Render(const std::string& tmpl, const std::vector<ChatMessage>& msgs, bool gen,
                   const ChatTemplateTokens& tokens = {}) {
  std::string warning = "stale";
  absl::StatusOr<std::string> r = ApplyChatTemplate(tmpl, msgs, gen, tokens, &warning);
  EXPECT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(warning, "") << "known template should not warn";
  return r.ok() ? *r : "";
}

TEST(ChatTemplateTest, SmolLM2InsertsDefaultSystem) {
  EXPECT_EQ(ChatTemplateFamilyName(kSmolLM2), "chatml+default-system");
  EXPECT_EQ(Render(kSmolLM2, {{"user", "Hello!"}}, true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n"
            "<|im_start|>user\nHello!<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(Render(kSmolLM2, kNoSystem, false),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n"
            "<|im_start|>user\nHello!<|im_end|>\n"
            "<|im_start|>assistant\nHi.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n");
}

TEST(ChatTemplateTest, SmolLM2ExplicitSystem) {
  EXPECT_EQ(Render(kSmolLM2, kConv, true),
            "<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nHello!<|im_end|>\n"
            "<|im_start|>assistant\nHi.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n");
  // No messages: the default system block lives inside the message loop.
  EXPECT_EQ(Render(kSmolLM2, {}, true), "<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, EscapedDefaultSystemAndPlainChatML) {
  EXPECT_EQ(Render(kQwen2, {{"user", " x "}}, true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n x <|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(ChatTemplateFamilyName(kChatML), "chatml");
  EXPECT_EQ(Render(kChatML, {{"user", "Hello!"}}, true),
            "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, Llama2) {
  EXPECT_EQ(ChatTemplateFamilyName(kLlama2), "llama2");
  EXPECT_EQ(Render(kLlama2, kConv, true),
            "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHello! [/INST] Hi. </s>"
            "<s>[INST] What is 2+2? [/INST]");
  EXPECT_EQ(Render(kLlama2, {{"user", "  Hello!\n"}}, true), "[INST] Hello! [/INST]");
  ChatTemplateTokens tok;
  tok.bos = "<BOS>";
  tok.eos = "<EOS>";
  EXPECT_EQ(Render(kLlama2, kNoSystem, false, tok),
            "[INST] Hello! [/INST] Hi. <EOS><BOS>[INST] What is 2+2? [/INST]");
  // The template rejects non-alternating roles.
  const std::vector<ChatMessage> bad = {{"user", "a"}, {"user", "b"}};
  absl::StatusOr<std::string> r = ApplyChatTemplate(kLlama2, bad, true, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("alternate"), std::string::npos);
}

TEST(ChatTemplateTest, Llama3) {
  EXPECT_EQ(ChatTemplateFamilyName(kLlama3), "llama3");
  EXPECT_EQ(Render(kLlama3, kConv, true),
            "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  // |trim, including Unicode whitespace (U+00A0, U+3000) as Python strips it.
  EXPECT_EQ(Render(kLlama3, {{"user", "\xC2\xA0 Hi \n\xE3\x80\x80"}}, false),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
}

TEST(ChatTemplateTest, Llama32DatedSystemHeader) {
  EXPECT_EQ(ChatTemplateFamilyName(kLlama32), "llama3.1");
  ChatTemplateTokens tok;
  tok.date_string = "26 Jul 2024";
  EXPECT_EQ(Render(kLlama32, kConv, true, tok),
            "<|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "You are terse.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(Render(kLlama32, {{"user", "Hello!"}}, false, tok),
            "<|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>");
  // Llama 3.2 calls strftime_now: today's date (UTC) by default.
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char today[32];
  std::strftime(today, sizeof(today), "%d %b %Y", &tm);
  EXPECT_NE(Render(kLlama32, {{"user", "x"}}, true).find(std::string("Today Date: ") + today),
            std::string::npos);
  // Llama 3.1 has no strftime_now: its literal default date.
  std::string llama31 = kLlama32;
  const size_t a = llama31.find("{%- if strftime_now");
  const size_t b = llama31.find("{%- else %}", a);
  ASSERT_NE(b, std::string::npos);
  llama31.erase(a, b + std::string("{%- else %}").size() - a);
  llama31.replace(llama31.find("26 Jul 2024"), 11, "23 Jul 2024");
  EXPECT_NE(Render(llama31, {{"user", "x"}}, true).find("Today Date: 23 Jul 2024\n\n<|eot_id|>"),
            std::string::npos);
}

TEST(ChatTemplateTest, Zephyr) {
  EXPECT_EQ(ChatTemplateFamilyName(kZephyr), "zephyr");
  EXPECT_EQ(Render(kZephyr, kConv, true),
            "<|system|>\nYou are terse.</s>\n<|user|>\nHello!</s>\n<|assistant|>\nHi.</s>\n"
            "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n");
  EXPECT_EQ(Render(kZephyr, {{"user", "Hello!"}}, false), "<|user|>\nHello!</s>\n");
}

TEST(ChatTemplateTest, Gemma) {
  EXPECT_EQ(ChatTemplateFamilyName(kGemma), "gemma");
  EXPECT_EQ(Render(kGemma, kNoSystem, true),
            "<start_of_turn>user\nHello!<end_of_turn>\n"
            "<start_of_turn>model\nHi.<end_of_turn>\n"
            "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
            "<start_of_turn>model\n");
  // System text is folded into the first user turn (Gemma 3's template).
  EXPECT_EQ(Render(kGemma, {{"system", "Be brief."}, {"user", " Hello! "}}, true),
            "<start_of_turn>user\nBe brief.\n\nHello!<end_of_turn>\n<start_of_turn>model\n");
  const std::vector<ChatMessage> bad = {{"assistant", "a"}};
  EXPECT_EQ(ApplyChatTemplate(kGemma, bad, true, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplateTest, Phi3) {
  EXPECT_EQ(ChatTemplateFamilyName(kPhi3), "phi3");
  EXPECT_EQ(Render(kPhi3, kConv, true),
            "<|system|>\nYou are terse.<|end|>\n<|user|>\nHello!<|end|>\n"
            "<|assistant|>\nHi.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n");
  EXPECT_EQ(Render(kPhi3, {{"user", "Hello!"}, {"assistant", "Hi."}}, false),
            "<|user|>\nHello!<|end|>\n<|assistant|>\nHi.<|end|>\n<|endoftext|>");
}

TEST(ChatTemplateTest, UnknownFallsBackToChatMLWithWarning) {
  const std::vector<ChatMessage> msgs = {{"user", "Hello!"}};
  for (const std::string& tmpl : {std::string("{{ messages[0]['content'] }}"), std::string()}) {
    std::string warning;
    absl::StatusOr<std::string> r = ApplyChatTemplate(tmpl, msgs, true, &warning);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");
    EXPECT_NE(warning.find("ChatML"), std::string::npos) << warning;
    EXPECT_EQ(ChatTemplateFamilyName(tmpl), "unknown");
    EXPECT_EQ(DetectChatTemplateFamily(tmpl), ChatTemplateFamily::kUnknown);
  }
  // Look-alikes we do not render natively are reported, not guessed at.
  EXPECT_EQ(ChatTemplateFamilyName(
                "{{'<|im_start|>' + message['role'] + '<|im_sep|>' + message['content']}}"),
            "unknown");
  EXPECT_EQ(ChatTemplateFamilyName("{{ '[INST] ' + message['content'] + ' [/INST]' }}"),
            "unknown");  // Mistral: no <<SYS>>
  // Null warning pointer is fine.
  EXPECT_TRUE(ApplyChatTemplate("", msgs, true, nullptr).ok());
}

TEST(ChatTemplateTest, RejectsUnknownRoles) {
  const std::vector<ChatMessage> msgs = {{"user", "a"}, {"tool", "b"}};
  for (const std::string* tmpl : {&kSmolLM2, &kLlama3, &kGemma}) {
    absl::StatusOr<std::string> r = ApplyChatTemplate(*tmpl, msgs, true, nullptr);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("\"tool\""), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find("message 1"), std::string::npos) << r.status();
  }
}

TEST(ChatTemplateTest, MalformedSourcesDoNotCrash) {
  const std::vector<ChatMessage> msgs = {{"user", "Hi"}};
  for (const char* src : {"{{ '<|im_start|>system", "{{ \"<|im_start|>system\\", "{% '",
                          "{# <|im_start|>", "{{", "}}", "<|im_start|>{{ '\\", "'\"{{'}}\"'"}) {
    std::string warning;
    absl::StatusOr<std::string> r = ApplyChatTemplate(src, msgs, true, &warning);
    ASSERT_TRUE(r.ok()) << src;
    EXPECT_NE(r->find("<|im_start|>user\nHi<|im_end|>\n"), std::string::npos) << src;
  }
}

}  // namespace
}  // namespace nibble
