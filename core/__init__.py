"""core: model, optimizer, tokenizer, data, training and inference. Plain PyTorch: never imports prefect."""
