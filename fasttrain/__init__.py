"""fasttrain: a performance-engineered PyTorch trainer for CIFAR-10 Efficient ResNets."""
__version__ = "0.1.0"
