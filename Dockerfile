# nibble on Debian 12: build, fetch the default model, and run the tests.
#   docker build -t nibble . && docker run --rm nibble \
#     build/bin/nibble-generate -m models/SmolLM2-135M-Instruct.Q4_1.gguf --chat -p "Hello" -n 32
FROM debian:bookworm
RUN apt-get update -qq && apt-get install -y -qq python3 python3-pip sudo && rm -rf /var/lib/apt/lists/*
ENV PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /nibble
COPY . .
RUN scripts/install-deps.sh && scripts/get-models.sh && scripts/build.sh
CMD ["build/bin/nibble-generate", "--help"]
