"""`edgellm finetune` / `edgellm merge`: LoRA and QLoRA on the CPU, adapters in PEFT's format."""
