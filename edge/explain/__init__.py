"""Explain stage: findings from a scored part, grounded prompts and the claim check, the llama.cpp
engine (in a supervised child process or a remote one), dialogue sessions and the explain worker.
Never imports the line."""
