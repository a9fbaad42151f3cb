"""Command-line interface; one module per subcommand. Kept torch-free at import so `--help` is instant."""

EMBEDDED_TARGET = "smollm2-135m"
DTYPE_CHOICES = ("auto", "fp32", "bf16")
DTYPE_HELP = "auto = bf16 on CUDA and on CPUs with fast bf16, else fp32"
