"""Reading trained crosscoders: metrics, splice-in, feature strengths, the latent browser, figures and the summary.

Nothing here trains: a crosscoder's held-out numbers come from crosscoders.evaluate.
"""
