"""The `ragraph` command line (the top layer): serve, index and its operations, models, keys, chat,
eval and eval-answers, loadtest, kuberay."""
