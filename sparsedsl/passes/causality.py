"""`causality`: prove that no query can see a future token.

The proof is an abstract interpretation over the IR. Each node gets facts:

  keys    `causal`        every key j in M[i, .] has j <= i
  blocks  `past_only`     every selected block lies wholly at or before i
          `covers_future` the set contains every block that starts after i
          `covers_current` the set contains every block that holds i and ends after it
  score   `safe`          which blocks' scores depend on tokens <= i only:
                          "all", "past" (blocks wholly at or before i), or "none"
  branch  `causal`        the branch attends only to keys at or before i

Rules (sound, not complete: a spec the proof cannot accept is rejected):

  causal, window(w)                  causal
  sink, global, strided, summary     not causal on their own
  tokens(B)                          causal iff B is past_only
  A & B                              causal if A or B is;  A | B: if both are;  ~A: never
  past(g), random(g, ..)             past_only
  future(g)                          covers_future;  current(g): covers_current
  recent(g, n)                       covers_current when n >= ceil(len / stride)
  ~B                                 covers both when B is past_only
  dot(q, pool(g))                    safe on past blocks (a block's pool reads all its tokens)
  probs(branch)                      safe everywhere when the branch is causal
  remap(s, g)                        safe everywhere when s is; otherwise safe nowhere (a block
                                     wholly in the past can overlap source blocks that end
                                     after the query), and a top-k over it is rejected
  topk(s, k, force, forbid)          the blocks it may choose freely, those neither forced nor
                                     forbidden, must be safe under s: unless s is safe
                                     everywhere, force | forbid must cover the future and the
                                     current blocks. The result is past_only when force is and
                                     the free choices are.
  attend(keys)                       causal iff keys is;  attend(pool, B): iff B is past_only

Besides attention masks, this also covers the gate: a top-k whose scores read
future keys would let a query's selection depend on the future.
"""
from __future__ import annotations

import math

from ..errors import CausalityError
from ..ir.graph import IR
from ..ir.ops import Kind


class Causality:
    name = "causality"

    def apply(self, ir: IR) -> None:
        for nid in ir.order():
            n = ir.node(nid)
            f = n["facts"]
            op = n["op"]
            ops = ir.operands(nid)
            fact = lambda arg, key: ir.node(ops[arg])["facts"][key]  # noqa: E731
            if n["kind"] is Kind.KEYS:
                if op in ("causal", "window"):
                    f["causal"] = True
                elif op in ("sink", "global", "strided", "summary", "not"):
                    f["causal"] = False
                elif op == "tokens":
                    f["causal"] = fact("blocks", "past_only")
                elif op == "and":
                    f["causal"] = fact("0", "causal") or fact("1", "causal")
                elif op == "or":
                    f["causal"] = fact("0", "causal") and fact("1", "causal")
                else:  # pragma: no cover
                    raise AssertionError(op)
            elif n["kind"] is Kind.BLOCKS:
                self._blocks(ir, nid, n, ops)
            elif n["kind"] is Kind.SCORE:
                if op == "dot":
                    f["safe"] = "past"
                elif op == "probs":
                    f["safe"] = "all"  # the branch itself was proven causal above
                elif op == "remap":
                    f["safe"] = "all" if fact("score", "safe") == "all" else "none"
                elif op == "groupsum":
                    f["safe"] = fact("score", "safe")
            elif n["kind"] is Kind.BRANCH:
                if op == "attend_tokens":
                    if not fact("keys", "causal"):
                        self._leak(ir, ops["keys"])
                elif op == "attend_pooled":
                    if not fact("blocks", "past_only"):
                        self._pooled_leak(ir, nid, ops["blocks"])
                f["causal"] = True
            elif n["kind"] is Kind.MIX:
                f["causal"] = True

    # blocks ---------------------------------------------------------------------
    def _blocks(self, ir: IR, nid: int, n: dict, ops: dict) -> None:
        f = n["facts"]
        op = n["op"]
        sub = lambda arg: ir.node(ops[arg])["facts"]  # noqa: E731
        f.update(past_only=False, covers_future=False, covers_current=False)
        if op in ("past", "random"):
            f["past_only"] = True
        elif op == "future":
            f["covers_future"] = True
        elif op == "current":
            f["covers_current"] = True
        elif op == "recent":
            g = ir.node(ops["grid"])["args"]
            f["covers_current"] = n["args"]["n"] >= math.ceil(g["len"] / g["stride"])
        elif op == "first":
            pass
        elif op == "not":
            if sub("0")["past_only"]:
                f["covers_future"] = f["covers_current"] = True
        elif op in ("and", "or"):
            a, b = sub("0"), sub("1")
            comb = (lambda x, y: x or y) if op == "or" else (lambda x, y: x and y)
            f["covers_future"] = comb(a["covers_future"], b["covers_future"])
            f["covers_current"] = comb(a["covers_current"], b["covers_current"])
            f["past_only"] = (a["past_only"] and b["past_only"]) if op == "or" else \
                (a["past_only"] or b["past_only"])
        elif op == "topk":
            force = sub("force") if "force" in ops else None
            forbid = sub("forbid") if "forbid" in ops else None
            cov_f = any(s is not None and s["covers_future"] for s in (force, forbid))
            cov_c = any(s is not None and s["covers_current"] for s in (force, forbid))
            free_is_past = cov_f and cov_c
            if sub("score")["safe"] == "none":
                score = ir.node(ops["score"])
                raise CausalityError(
                    "this selection can depend on future tokens: its scores "
                    f"(`{score['span'].text}`) can read tokens after the query even for blocks "
                    "wholly in the past (a remapped block overlaps source blocks that end later)",
                    n["span"],
                    note="score the blocks on the grid they are selected from, or remap the "
                         "probabilities of a causal branch: `remap(probs(...), g)`")
            if sub("score")["safe"] != "all" and not free_is_past:
                score = ir.node(ops["score"])
                raise CausalityError(
                    "this selection can depend on future tokens: it may choose blocks that are not "
                    f"wholly in the past, and their scores (`{score['span'].text}`) read every "
                    "token of a block", n["span"],
                    note="force the blocks holding the query and forbid later ones, e.g. "
                         "`force=current(g), forbid=future(g)`, or `forbid=~past(g)`")
            f["past_only"] = (force is None or force["past_only"]) and free_is_past
            f["covers_future"] = bool(force and force["covers_future"])
            f["covers_current"] = bool(force and force["covers_current"])

    # reports --------------------------------------------------------------------
    def _culprit(self, ir: IR, nid: int) -> int:
        """The smallest sub-expression that makes a key set non-causal."""
        n = ir.node(nid)
        ops = ir.operands(nid)
        if n["op"] == "or":
            for arg in ("0", "1"):
                if not ir.node(ops[arg])["facts"]["causal"]:
                    return self._culprit(ir, ops[arg])
        return nid

    def _leak(self, ir: IR, keys: int) -> None:
        c = self._culprit(ir, keys)
        n = ir.node(c)
        what = {
            "sink": "keys j < n include keys after early queries",
            "global": "global tokens see keys after them",
            "strided": "(i - j) mod step == offset holds for j > i too",
            "summary": "summary columns lie after early queries",
            "not": "a complement contains keys after the query",
            "tokens": "the selected blocks can contain tokens after the query",
            "and": "neither side restricts keys to j <= i",
        }.get(n["op"], "this key set is not restricted to j <= i")
        raise CausalityError(f"queries can see future keys: `{n['span'].text}`: {what}", n["span"],
                             note="intersect with `causal`, e.g. `(...) & causal`")

    def _pooled_leak(self, ir: IR, nid: int, blocks: int) -> None:
        n = ir.node(blocks)
        raise CausalityError(
            f"queries can see future keys: the pooled blocks `{n['span'].text}` may include blocks "
            "that are not wholly in the past, and a pooled block reads all of its tokens", n["span"],
            note="attend pooled blocks only through `past(g)` (or a subset of it)")
