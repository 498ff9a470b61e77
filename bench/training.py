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
    return pipeline.Output(**train.training_numerics(train.TrainConfig(), device).loader_output)


def training_step(num_classes: int, numerics: recipe.Numerics, compiled: bool):
    """train.py's network, optimiser and step with the paper's defaults: step(images, labels)."""
    cfg = train.TrainConfig(compile=compiled)
    network = train.build_network(cfg, num_classes, Rank(0, 1, 1, numerics.device), numerics.channels_last)
    return lambda images, labels: recipe.train_step(network.train, network.optimizer, images, labels,
                                                    numerics.autocast)


def model_alone(num_classes, device, batch, compiled):
    numerics = train.training_numerics(train.TrainConfig(), device)
    step = training_step(num_classes, numerics, compiled)
    # As the loaders hand them over (loader_output): on a GPU bfloat16 in channels-last memory.
    images = torch.randn(batch, 3, 224, 224, device=device).to(getattr(torch, numerics.loader_dtype))
    if numerics.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def work(n: int) -> int:
        for _ in range(n):
            step(images, labels)
        return n * batch
    return work


def end_to_end(data, num_classes, device, batch, threads, compiled, reader_workers=None, reads_in_flight=None):
    """The training step fed by train_loader, with its reader workers and reads in flight (None: its defaults)."""
    step = training_step(num_classes, train.training_numerics(train.TrainConfig(), device), compiled)
    reading = pipeline.Reading(num_threads=threads, reader_workers=reader_workers, reads_in_flight=reads_in_flight)
    batches = endless(pipeline.train_loader(data, batch, output=loader_output(device), reading=reading))

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
    numerics = recipe.numerics(device, cfg.dtype)  # as eval.main sets it
    model = evaluation.AlexNet(num_classes=num_classes).to(device).eval()  # as eval.load_model leaves it
    loader = evaluation.split_loader(cfg, Rank(0, 1, 1, device), numerics, "ten")
    with torch.inference_mode(), numerics.autocast:
        evaluation.ten_crop_probabilities(model, torch.zeros(batch, 10, 3, 224, 224, device=device))

    def work(n: int) -> int:
        return sum(int(evaluation.score_split(model, loader, numerics, keep_predictions=False)[1])
                   for _ in range(n))
    return work
