"""The whole-run pipeline, above every stage: a RunConfig -> checks that need no weights -> model, statistics,
ranking, evaluator (:func:`prepare`) -> search -> plan.json (:func:`run_search`).

Every command that scores plans (``run``, ``worker``, ``esap``) and the benchmarks build what they need with
:func:`prepare`, so the model is loaded, the criterion parsed and the evaluator built in one place.

    prepared = prepare(RunConfig.from_sources("problems/testbed-50.toml"))
    prepared.evaluator.evaluate([prepared.kept_for(prepared.space.uniform())])
    result = run_search(RunConfig.from_sources("problems/testbed-50.toml"))
"""
from allocopt.pipeline.prepare import Prepared, check_request, prepare
from allocopt.pipeline.run import RunResult, run_search

__all__ = ["Prepared", "RunResult", "check_request", "prepare", "run_search"]
