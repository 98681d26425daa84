// Helpers shared by the readers that fill a VocabSpec (GGUF, HF tokenizer.json).
//
// Goals: one place for llama.cpp's end-of-generation heuristic so every format
// stops generation on the same tokens. Non-goals: tokenization itself.
#pragma once

#include "engine/tokenizer/vocab.h"

namespace nibble::io {

// Sets vocab->eog_ids to eos_id (if >= 0) plus every token whose text is one of
// the end-of-turn markers llama.cpp treats as end-of-generation
// (<|eot_id|>, <|im_end|>, <|end|>, <end_of_turn>, <|endoftext|>, <|eom_id|>,
// <|end_of_text|>, <EOT>, <|return|>, <|call|>, <end_of_utterance>, ...),
// whatever their token type (as llama.cpp does), plus "</s>" when it is a
// control token. Sorted, without duplicates.
void FillEogIds(VocabSpec* vocab);

}  // namespace nibble::io
