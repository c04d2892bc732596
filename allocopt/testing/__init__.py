"""Test doubles shipped with allocopt, for its tests, its benchmarks and plugin authors' tests: tiny random models of
every MoE family built from transformers configs (``tiny``) and a toy allocation objective that needs no model
(``toy``)."""
