"""Tools for people exploring patterns, behind the CLI verbs of the same names.

    keysets.py   which keys each query attends, counted per query from the IR (no tensors)
    cost.py      `sparsedsl cost`: keys per branch, FLOPs and bytes against dense causal
    show.py      `sparsedsl show`: masks per branch from the reference (a top-k: the
                 compiled kernels' selection), drawn as text or a PNG
    fuzz.py      `sparsedsl fuzz`: generated specs compiled and checked against the
                 reference (outputs and gradients), failures shrunk to a `.attn` file
    term.py      terminal output: colours on a TTY, tables, a progress line

None of them is imported by `import sparsedsl`; `cost` needs no torch unless a
spec uses `random`.
"""
