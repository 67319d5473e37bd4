"""The orchestration above the stages: params, the pipeline of one run, the runner, its scheduler and torchrun.

Everything that reads a RunConfig lives here; the stages below take plain arguments and never import run/.
"""
