// Test-only command-line front end of the SentencePiece library (the
// reference), so tests whose process links gRPC (which must not load
// libsentencepiece: Debian's build bundles its own protobuf) can still train a
// model and get the library's ids, from a child process.
//   sp_tool train SPM_TRAIN_FLAGS...     e.g. --input=x.txt --model_prefix=m --vocab_size=512
//   sp_tool encode MODEL < text          prints the ids, space-separated
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>

#include "tests/spm/sp_reference.h"

int main(int argc, char** argv) {
  using nibble::testing::SpReference;
  const std::string cmd = argc > 1 ? argv[1] : "";
  std::string error;
  if (cmd == "train") {
    std::string args;
    for (int i = 2; i < argc; ++i) args += std::string(i > 2 ? " " : "") + argv[i];
    if (!nibble::testing::TrainSentencePiece(args, &error)) {
      std::fprintf(stderr, "sp_tool train: %s\n", error.c_str());
      return 1;
    }
    return 0;
  }
  if (cmd == "encode" && argc == 3) {
    auto sp = SpReference::Load(argv[2], &error);
    if (sp == nullptr) {
      std::fprintf(stderr, "sp_tool encode: %s: %s\n", argv[2], error.c_str());
      return 1;
    }
    const std::string text(std::istreambuf_iterator<char>(std::cin), {});
    const auto ids = sp->Encode(text);
    for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? " " : "", ids[i]);
    std::printf("\n");
    return 0;
  }
  std::fprintf(stderr, "usage: sp_tool train SPM_TRAIN_FLAGS... | sp_tool encode MODEL < text\n");
  return 2;
}
