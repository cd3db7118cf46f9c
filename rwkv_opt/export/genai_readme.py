"""The README.md that `rwkv-opt export genai` writes into DIR: what the directory holds, how C#, C and
Python apps run it, and which of the model card's sampling settings genai cannot express."""

from __future__ import annotations

_TEMPLATE = """# RWKV-7 for onnxruntime-genai

Exported by `rwkv-opt export genai` from the rwkv-opt artifact of target `{target}`
(execution provider: {provider}). Load the directory with `og.Model(DIR)`; nothing else is needed.

| file | what |
|---|---|
| `model.onnx` (+ `model.onnx.data`) | the model (inputs and outputs below) |
| `genai_config.json` | model facts, end-of-document token 0 as eos/pad, provider options, search defaults |
| `tokenizer.json`, `tokenizer_config.json` | the RWKV World vocabulary as byte-level BPE (see "Tokenizer") |
| `manifest.json` | where this export came from (source artifact, target, versions) |

Inputs: `input_ids` int64 [B,T]; per layer i `past_key_values.{{i}}.conv_state` [B,2,C] (the two
token-shift states, time mix then channel mix) and `past_key_values.{{i}}.recurrent_state` [B,H,N,N]
(the WKV state, fp32). Outputs: `logits` and `present.{{i}}.conv_state` / `present.{{i}}.recurrent_state`.

## Python

```python
import onnxruntime_genai as og

model = og.Model("DIR")
tokenizer = og.Tokenizer(model)
stream = tokenizer.create_stream()
params = og.GeneratorParams(model)
params.set_search_options(max_length=512)          # the model card's sampling is the default
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("User: What is RWKV?\\n\\nAssistant:"))
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
```

Exact World tokens (see "Tokenizer"): `generator.append_tokens(WorldTokenizer().encode(text))` with
`from rwkv_opt.reference.tokenizer import WorldTokenizer` (or the official `rwkv` package's
`TRIE_TOKENIZER`).

Two things differ from transformer models, because RWKV is a recurrent network (measured with
onnxruntime-genai 0.18.0):

- Multi-turn: genai does not run the last generated token through the model when more tokens are
  appended after it, so start the next turn with that token:
  `generator.append_tokens([last_token] + next_turn_ids)`. Then the state equals one run over every
  token once (`generator.rewind_to(0)` starts a conversation afresh).
- Batches: give every row the same number of prompt tokens. `tokenizer.encode_batch` pads shorter
  rows with token 0, which the model reads like any token and which changes that row's state.

## C#

```csharp
using Microsoft.ML.OnnxRuntimeGenAI;

using var model = new Model("DIR");
using var tokenizer = new Tokenizer(model);
using var stream = tokenizer.CreateStream();
using var generatorParams = new GeneratorParams(model);
generatorParams.SetSearchOption("max_length", 512);
using var generator = new Generator(model, generatorParams);
using var prompt = tokenizer.Encode("User: What is RWKV?\\n\\nAssistant:");
generator.AppendTokenSequences(prompt);      // or generator.AppendTokens(worldIds) for exact World ids
while (!generator.IsDone())
{{
    generator.GenerateNextToken();
    Console.Write(stream.Decode(generator.GetNextTokens()[0]));
}}
```

## C

```c
#include "ort_genai_c.h"   /* every call returns an OgaResult*: NULL on success */

OgaModel* model;              OgaCreateModel("DIR", &model);
OgaTokenizer* tokenizer;      OgaCreateTokenizer(model, &tokenizer);
OgaTokenizerStream* stream;   OgaCreateTokenizerStream(tokenizer, &stream);
OgaSequences* prompt;         OgaCreateSequences(&prompt);
OgaTokenizerEncode(tokenizer, "User: What is RWKV?\\n\\nAssistant:", prompt);
OgaGeneratorParams* params;   OgaCreateGeneratorParams(model, &params);
OgaGeneratorParamsSetSearchNumber(params, "max_length", 512);
OgaGenerator* generator;      OgaCreateGenerator(model, params, &generator);
OgaGenerator_AppendTokenSequences(generator, prompt);  /* or OgaGenerator_AppendTokens(generator, ids, n) */
while (!OgaGenerator_IsDone(generator)) {{
    OgaGenerator_GenerateNextToken(generator);
    const int32_t* next; size_t n;
    OgaGenerator_GetNextTokens(generator, &next, &n);
    const char* piece;        OgaTokenizerStreamDecode(stream, next[0], &piece);
    fputs(piece, stdout);
}}
/* OgaDestroyGenerator, OgaDestroyGeneratorParams, OgaDestroySequences, OgaDestroyTokenizerStream,
   OgaDestroyTokenizer, OgaDestroyModel when done */
```

## Search defaults (genai_config.json "search")

From the RWKV-7 G1 model card as far as genai's search options go: sampling on, temperature 1.0,
top_p 0.5, no top-k limit, max_length {max_length} (prompt + reply; raise it per request, the model
itself has no context limit). genai cannot express the card's penalties: presence penalty 2.0,
frequency penalty 0.1 and their per-token decay 0.99 are additive and decay over time, while genai
only has `repetition_penalty` (divides the logits of every token seen, no decay); it is left at 1.0
(off). Apps that want the card's penalties sample on the host: read `generator.get_logits()`, apply
them, and `append_tokens` the drawn token. Generation stops at token 0 (end of document); chat apps
usually also stop at the text "\\n\\n" that ends a reply.

## Tokenizer

RWKV's World tokenizer is a greedy longest match over UTF-8 bytes; genai's tokenizer loader reads
BPE and SentencePiece only. `tokenizer.json` is the World vocabulary as byte-level BPE: decoding is
exact (every id maps to its bytes), encoding is close to World but not always equal (BPE has no
notion of left-to-right; rwkv-opt's `reports/genai_tokenizer.md` measures the agreement). The model
was trained on World tokens, so for exact prompts encode with rwkv-opt's `WorldTokenizer` (or the
official `rwkv` package's) and pass the ids with `append_tokens`. Token 0 is named `<|endoftext|>`.
"""


def render(target: str, provider: str, max_length: int) -> str:
    """The README text for an export of `target` running on `provider`."""
    return _TEMPLATE.format(target=target, provider=provider, max_length=max_length)
