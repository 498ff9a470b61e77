"""The rows that run the network: train.py's own training step and eval.py's own ten-crop pass.

  model           train.py's training step (model/recipe.py: the paper's SGD; bfloat16 autocast and channels-last
                  on a GPU, as train.py runs them) on one synthetic batch already on the device
  end_to_end      the same step fed by train_loader
  *_compiled      the same with train.py's --compile
  eval_tencrop    eval.py's evaluation of the whole val split with ten patches per image, the loader built and
                  the model warmed up before the clock starts
"""
import torch

import pipeline
import train
from bench.harness import endless
from model import recipe
from runtime import Rank


def loader_output(device: torch.device) -> pipeline.Output:
    """What train.py asks the loaders for with its defaults: on a GPU bfloat16 images in channels-last memory."""
    cuda = device.type == "cuda"
    return pipeline.Output(device=device, dtype="bfloat16" if cuda else None, channels_last=cuda)


def training_step(num_classes: int, device: torch.device, compiled: bool):
    """train.py's network, optimiser and step for `device` with the paper's defaults: step(images, labels)."""
    cfg = train.TrainConfig(compile=compiled)
    numerics = recipe.numerics(device, cfg.dtype, cfg.channels_last)
    network = train.build_network(cfg, num_classes, Rank(0, 1, 1, device), numerics.channels_last)
    return lambda images, labels: recipe.train_step(network.train, network.optimizer, images, labels,
                                                    numerics.autocast)


def model_alone(num_classes, device, batch, compiled):
    step = training_step(num_classes, device, compiled)
    images = torch.randn(batch, 3, 224, 224, device=device)
    if device.type == "cuda":
        images = images.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def work(n: int) -> int:
        for _ in range(n):
            step(images, labels)
        return n * batch
    return work


def end_to_end(data, num_classes, device, batch, threads, compiled):
    step = training_step(num_classes, device, compiled)
    batches = endless(pipeline.train_loader(data, batch, output=loader_output(device),
                                            reading=pipeline.Reading(num_threads=threads)))

    def work(n: int) -> int:
        for _ in range(n):
            step(*next(batches))
        return n * batch
    return work


def eval_tencrop(data, num_classes, device, batch, threads):
    """Whole passes of eval.py's ten-crop evaluation over the val split; one unit = one pass. eval.py's own loader,
    model layout and dtype; the loader is built and the model has run once (cuDNN picks its algorithms) before the
    work is returned: a pass is timed alone."""
    import eval as evaluation  # here, not at the top: the other rows run without eval.py's imports
    cfg = evaluation.EvalConfig(data=str(data), batch_size=batch, num_threads=threads)
    model = evaluation.AlexNet(num_classes=num_classes).to(device).eval()  # as eval.load_model leaves it
    loader = evaluation.split_loader(cfg, Rank(0, 1, 1, device), "ten")
    with torch.inference_mode(), torch.autocast(device.type, dtype=getattr(torch, cfg.dtype),
                                                 enabled=device.type == "cuda"):
        evaluation.ten_crop_probabilities(model, torch.zeros(batch, 10, 3, 224, 224, device=device))

    def work(n: int) -> int:
        return sum(int(evaluation.score_split(model, loader, device, cfg.dtype, keep_predictions=False)[1])
                   for _ in range(n))
    return work
