"""Run as a script by :mod:`avatarforcing.world.speech_tts`, in a fresh process per clip: libespeak-ng keeps
internal state from one synthesis to the next (the same sentence comes out a few samples longer or shorter the
second time), so a clip is deterministic only if its sentences are spoken in a process that spoke nothing before.

stdin: one JSON object {voice, rate, pitch, sentences: [str]}.  stdout: one JSON line [{samples, phonemes:
[[sample, name], ...]}, ...] (one entry per sentence; ``sample`` is the phoneme's start in the sentence's
audio), then the int16 little-endian audio of all sentences, concatenated; the sample rate is in the JSON's
``sample_rate`` key.  Standard library only (ctypes), so it starts fast.
"""
import ctypes
import json
import sys

_PHONEME, _SYNCHRONOUS, _PHONEME_EVENTS, _DONT_EXIT = 7, 2, 0x0001, 0x8000
_RATE, _PITCH = 1, 3


class _Id(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):            # espeak_EVENT of speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        lib = ctypes.CDLL("libespeak-ng.so.1")
    except OSError as exc:
        print(f"libespeak-ng not found ({exc}); install it with: apt-get install -y espeak-ng", file=sys.stderr)
        return 3
    sample_rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, None, _PHONEME_EVENTS | _DONT_EXIT)
    if sample_rate <= 0:
        print("espeak_Initialize failed; is espeak-ng-data installed?", file=sys.stderr)
        return 3
    audio, phonemes = [], []

    @_CALLBACK
    def callback(wav, n, events):
        if n > 0:
            audio.append(ctypes.string_at(wav, 2 * n))
        i = 0
        while events[i].type != 0:
            if events[i].type == _PHONEME:
                phonemes.append([events[i].sample, events[i].id.string.decode("ascii", "replace")])
            i += 1
        return 0

    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(req["voice"].encode()) != 0:
        print(f"espeak-ng has no voice {req['voice']!r}", file=sys.stderr)
        return 3
    lib.espeak_SetParameter(_RATE, int(req["rate"]), 0)
    lib.espeak_SetParameter(_PITCH, int(req["pitch"]), 0)
    out, chunks = [], []
    for text in req["sentences"]:
        audio.clear()
        phonemes.clear()
        data = text.encode()
        lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)
        lib.espeak_Synchronize()
        pcm = b"".join(audio)
        out.append({"samples": len(pcm) // 2, "phonemes": list(phonemes)})
        chunks.append(pcm)
    sys.stdout.buffer.write(json.dumps({"sample_rate": sample_rate, "sentences": out}).encode() + b"\n")
    sys.stdout.buffer.write(b"".join(chunks))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
