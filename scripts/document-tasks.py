#!/usr/bin/env python3
"""Document-task prompts for the draft head, built from the model's own answers to training prompts.

usage: document-tasks.py TOKENIZER_JSON N OUT_JSONL DISTILL_CACHE...

Each DISTILL_CACHE is a `distill-train-*.json` file `hat train-adapter --draft-head feature` wrote
under DIR/device/adapter-train/ (answers to training prompts only, never to held-out ones). Each
answer of 60 words or more, cut after its last full sentence, becomes a passage; an instruction
(summarise, list the points, retitle, simplify, ...) goes before it or, three times in ten, after
it. N of them, shuffled with a fixed seed, are written as chat JSON lines for --data. This is how
the stage-7 experiment in docs/draft-head/training.md made its data.
"""
import json, random, sys
if len(sys.argv) < 5:
    sys.exit(__doc__.strip().splitlines()[2])
tok = json.load(open(sys.argv[1]))
vocab = {i: t for t, i in tok['model']['vocab'].items()}
for a in tok.get('added_tokens', []): vocab[a['id']] = a['content']
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~")+1)) + list(range(ord("¡"), ord("¬")+1)) + list(range(ord("®"), ord("ÿ")+1))
    cs = bs[:]; n = 0
    for b in range(256):
        if b not in bs: bs.append(b); cs.append(256+n); n += 1
    return {chr(c): b for b, c in zip(bs, cs)}
dec = bytes_to_unicode()
def detok(ids):
    return bytes(b for i in ids for ch in vocab[i] for b in ([dec[ch]] if ch in dec else list(ch.encode()))).decode('utf8', 'replace')
instr = [
 "Summarise the following text in two sentences.",
 "Summarize this in one short paragraph.",
 "List the main points of the text below as bullet points.",
 "What is the main idea of this text? Answer briefly.",
 "Give the following text a short title, then explain why you chose it.",
 "Rewrite the following text so that a ten-year-old could understand it.",
 "Read the text below and list any concrete steps or recommendations it makes.",
 "Write three questions a reader might ask after reading this text, and answer them from the text.",
 "Turn the following text into a short email to a colleague.",
 "Which parts of the following text are facts, and which are opinions or advice?",
]
rng = random.Random(7)
out = []
for path in sys.argv[4:]:
    for seq in json.load(open(path)):
        ans = seq['tokens'][seq['prompt_len']:]
        text = detok([t for t in ans if vocab.get(t, '') not in ('<|im_end|>', '<|endoftext|>', '<|im_start|>')]).strip()
        cut = max(text.rfind('. '), text.rfind('.\n'))
        if cut > 200: text = text[:cut+1]
        if len(text.split()) < 60: continue
        i = rng.choice(instr)
        content = f"{i}\n\n{text}" if rng.random() < 0.7 else f"{text}\n\n{i}"
        out.append(json.dumps({"messages": [{"role": "user", "content": content}]}))
rng.shuffle(out)
n = int(sys.argv[2])
open(sys.argv[3], 'w').write('\n'.join(out[:n]) + '\n')
print(len(out), 'candidates,', min(n, len(out)), 'written')
