"""fasttrain: a performance-engineered PyTorch trainer for CIFAR-10 Efficient ResNets."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # fasttrain.load_model(path) -> (model, config): imported on first use, so that `import fasttrain`
    # stays light (the CLI's --help, the config checks) and pulls in torch only when asked
    if name == "load_model":
        from fasttrain.evaluate import load_model

        return load_model
    raise AttributeError(f"module 'fasttrain' has no attribute {name!r}")
