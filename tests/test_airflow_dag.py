"""The Airflow DAG that kedro-airflow generates from the project's pipelines.

``kedro airflow create`` runs for real in a throw-away copy of the project. Airflow itself is not a
project dependency (it brings ~150 packages of its own), so the generated file is checked without it:
it compiles, and its syntax tree gives each task's Kedro nodes and the ``>>`` edges between tasks,
compared with the registered pipeline's nodes and node dependencies. With ``AIRFLOW_PYTHON`` pointing at
an interpreter that has ``apache-airflow`` and ``kedro`` installed, the same file is also loaded by
Airflow's own ``DagBag`` and its tasks and upstream sets compared the same way.
"""

from __future__ import annotations

import ast
import graphlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_project_copy  # noqa: E402
from team_servers import clean_env  # noqa: E402

pytestmark = pytest.mark.slow
ENV = "team"


@dataclass
class Dag:
    settings: dict[str, str]            # env, pipeline_name, package_name
    dag_id: str
    dag_args: dict[str, str]            # the other @dag(...) arguments, as source text
    tasks: dict[str, list[str]]         # task id -> the Kedro nodes it runs
    edges: set[tuple[str, str]]         # (upstream task id, downstream task id)


def read_dag(path: Path) -> Dag:
    """The structure of a kedro-airflow DAG file, from its syntax tree (the file must also compile)."""
    source = path.read_text()
    compile(source, str(path), "exec")
    tree = ast.parse(source)
    settings = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    [dag_fn] = [f for f in tree.body if isinstance(f, ast.FunctionDef)
                and any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "dag" for d in f.decorator_list)]
    [dag_call] = [d for d in dag_fn.decorator_list if isinstance(d, ast.Call)]
    dag_args = {k.arg: ast.unparse(k.value) for k in dag_call.keywords}
    dag_id = ast.literal_eval(dag_args.pop("dag_id"))
    assert any(isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "")
               == dag_fn.name for n in tree.body), "the DAG function is never called at module level"

    functions: dict[str, tuple[str, list[str]]] = {}  # function name -> (task id, nodes)
    for fn in dag_fn.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        [decorator] = fn.decorator_list
        assert getattr(decorator.func, "id", "") == "task", ast.unparse(decorator)
        task_id = next(k.value.value for k in decorator.keywords if k.arg == "task_id")
        [stmt] = fn.body
        call = stmt.value
        assert call.func.id == "_run_kedro_node", ast.unparse(stmt)
        [names] = [k.value for k in call.keywords if k.arg == "node_names"]
        functions[fn.name] = (task_id, [ast.literal_eval(e) for e in names.elts])

    tasks: dict[str, list[str]] = {}
    edges: set[tuple[str, str]] = set()
    for stmt in dag_fn.body:
        if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "tasks":
            for key, value in zip(stmt.value.keys, stmt.value.values, strict=True):
                task_id, nodes = functions[value.func.id]
                assert key.value == task_id  # the dict key is the task the function makes
                tasks[task_id] = nodes
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.BinOp):
            assert isinstance(stmt.value.op, ast.RShift), ast.unparse(stmt)
            upstream, downstream = (ast.literal_eval(side.slice) for side in (stmt.value.left, stmt.value.right))
            edges.add((upstream, downstream))
    assert len(tasks) == len(functions)
    assert {t for edge in edges for t in edge} <= set(tasks), "an edge names an undefined task"
    return Dag(settings, dag_id, dag_args, tasks, edges)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The project's pipeline (nodes, node dependencies, in-memory datasets) and the two generated DAGs."""
    project = make_project_copy(tmp_path_factory.mktemp("airflow") / "project")
    # The team env is generated against a local store: only its name goes into the DAG file.
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlruns/dag.db", MLFLOW_TRACKING_USERNAME="u",
                    MLFLOW_TRACKING_PASSWORD="p")
    dags = {}
    for variant, extra in (("per_node", []), ("memory", ["--group-by", "memory"])):
        target = project / "dags" / variant
        made = subprocess.run([sys.executable, "-m", "kedro", "airflow", "create", f"--env={ENV}",
                               f"--target-dir={target}", *extra], cwd=project, env=env, capture_output=True,
                              text=True, timeout=600)
        assert made.returncode == 0, made.stderr[-3000:]
        [dags[variant]] = target.glob("*.py")
    assert dags["memory"].name == f"llm_caption_{ENV}_dag.py"

    from kedro.config import OmegaConfigLoader
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project
    from kedro.io import DataCatalog, MemoryDataset

    from llm_caption.settings import CONFIG_LOADER_ARGS

    bootstrap_project(project)
    pipeline = pipelines["__default__"]
    loader = OmegaConfigLoader(conf_source=str(project / "conf"), env=ENV, **CONFIG_LOADER_ARGS)
    catalog = DataCatalog.from_config(loader["catalog"])
    produced = {name for node in pipeline.nodes for name in node.outputs}
    in_memory = {name for name in produced if name not in catalog or isinstance(catalog.get(name), MemoryDataset)}
    return pipeline, in_memory, dags


def node_edges(pipeline) -> set[tuple[str, str]]:
    return {(parent.name, child.name) for child, parents in pipeline.node_dependencies.items() for parent in parents}


def test_one_task_per_node_with_the_pipelines_dependencies(generated):
    pipeline, _, dags = generated
    dag = read_dag(dags["per_node"])
    assert dag.settings == {"env": ENV, "pipeline_name": "__default__", "package_name": "llm_caption"}
    assert dag.dag_id == "llm-caption"
    assert all(len(nodes) == 1 for nodes in dag.tasks.values())
    node_of = {task: nodes[0] for task, nodes in dag.tasks.items()}
    assert sorted(node_of.values()) == sorted(n.name for n in pipeline.nodes)
    assert {(node_of[a], node_of[b]) for a, b in dag.edges} == node_edges(pipeline)
    assert len(pipeline.nodes) > 30 and len(dag.edges) > 40  # the whole default pipeline, not a slice


def test_memory_grouped_dag_keeps_in_memory_datasets_inside_one_task(generated):
    """The DAG to deploy: nodes linked by an in-memory dataset share a task (Airflow tasks share only files)."""
    pipeline, in_memory, dags = generated
    dag = read_dag(dags["memory"])
    assert dag.settings["env"] == ENV
    # conf/team/airflow.yml: weekly, one active run at a time (runs share the project's data files).
    assert dag.dag_args["schedule"] == "'@weekly'" and dag.dag_args["max_active_runs"] == "1"
    assert dag.dag_args["start_date"] == "datetime(2026, 1, 1)" and dag.dag_args["catchup"] == "False"
    task_of = {node: task for task, nodes in dag.tasks.items() for node in nodes}
    all_nodes = [n.name for n in pipeline.nodes]
    assert sorted(task_of) == sorted(all_nodes) and sum(map(len, dag.tasks.values())) == len(all_nodes)

    assert in_memory  # data_engineering passes records in memory between its validation steps
    for name in in_memory:
        users = {n.name for n in pipeline.nodes if name in n.outputs or name in n.inputs}
        assert len({task_of[u] for u in users}) == 1, (name, users)
    grouped = [nodes for nodes in dag.tasks.values() if len(nodes) > 1]
    assert grouped and len(dag.tasks) < len(all_nodes)

    # Task edges are exactly the node dependencies between different tasks, and they form a DAG.
    expected = {(task_of[a], task_of[b]) for a, b in node_edges(pipeline) if task_of[a] != task_of[b]}
    assert dag.edges == expected
    sorter = graphlib.TopologicalSorter({t: set() for t in dag.tasks})
    for upstream, downstream in dag.edges:
        sorter.add(downstream, upstream)
    order = {task: i for i, task in enumerate(sorter.static_order())}
    # The registration nodes run after the training that produces what they register.
    assert order[task_of["register_best_method"]] > order[task_of["finetune_methods"]]
    assert order[task_of["register_best_captioner"]] > order[task_of["train_caption_models"]]


AIRFLOW_CHECK = """
import json, sys
from airflow.models import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
[dag] = bag.dags.values()
print(json.dumps({"dag_id": dag.dag_id,
                  "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}}))
"""


@pytest.mark.skipif(not os.environ.get("AIRFLOW_PYTHON"), reason="set AIRFLOW_PYTHON to an interpreter with "
                    "apache-airflow and kedro to load the DAG with Airflow itself")
def test_airflow_loads_the_generated_dag(generated, tmp_path):
    _, _, dags = generated
    env = clean_env(AIRFLOW_HOME=str(tmp_path / "airflow_home"))
    loaded = subprocess.run([os.environ["AIRFLOW_PYTHON"], "-c", AIRFLOW_CHECK, str(dags["memory"].parent)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    seen = json.loads(loaded.stdout.strip().splitlines()[-1])
    dag = read_dag(dags["memory"])
    assert seen["dag_id"] == dag.dag_id
    expected = {task: sorted(a for a, b in dag.edges if b == task) for task in dag.tasks}
    assert seen["upstream"] == expected
