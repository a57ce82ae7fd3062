"""Reference decoding for engine tests: the definition of greedy, one full forward per token."""

import torch

GREEDY = dict(temperature=0.0, ignore_eos=True)


def full_forward_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def run(engine, requests, stagger=False):
    """requests: {id: (prompt, params)} -> ({id: tokens}, {id: [StepOutput]}, steps); with stagger a
    new request joins every step."""
    tokens, outs, steps = {rid: [] for rid in requests}, {rid: [] for rid in requests}, 0
    pending = list(requests.items())
    if not stagger:
        for rid, (prompt, params) in pending:
            engine.add_request(rid, prompt, params)
        pending = []
    while pending or engine.has_unfinished():
        if pending:
            rid, (prompt, params) = pending.pop(0)
            engine.add_request(rid, prompt, params)
        steps += 1
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            outs[out.request_id].append(out)
    return tokens, outs, steps
