"""Inference: one protocol (base.py), several backends — transformers (in-process), vllm (own venv, servers), openai
(HTTP) —, the engines a config asks for, and the model's roles over tables (actor, judge, meta-judge, evaluator)."""
