"""Stage evaluate: teacher-forced top-1, change top-1, NLL, first-token accuracy on the test split;
free-running unit error rate and length error; bitrate and codebook health of taste_rvq.

    python stages/evaluate.py <manifest> <whisper> <text> <s3> <train s3> <models_dir> <metrics.json> <plots_dir>
        [--train-codes <tokenize table of the train split>] [--speaker <speaker table of the test split>]
        [--words <word timings of the test split>] [--vocoder <the vocoder stage's model dir>] [--listen <dir>]
        [--units-out <free-running units table>]

The first four are the test split's tables; <models_dir>/<variant> holds each trained variant (every
name of train.variants and train.finetune).
"""

import argparse
from pathlib import Path

from taste_pipeline import evaluate, params, train_params, vocoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for table in ("manifest", "whisper", "text", "s3"):
        ap.add_argument(table, help=f"{table} table of the test split")
    ap.add_argument("train_s3", help="s3 table of the train split (for the most-frequent-unit baseline)")
    ap.add_argument("models_dir")
    ap.add_argument("metrics")
    ap.add_argument("plots_dir")
    ap.add_argument("--train-codes", help="tokenize table of the train split (codes of tokenize.model): dead codes")
    ap.add_argument("--speaker", help="speaker table of the test split (variants with train.speaker embedding)")
    ap.add_argument("--words", help="true word timings of the test split (the synthesize stage's): alignment scores; "
                    "skipped when the file does not exist (a corpus without them)")
    ap.add_argument("--vocoder", help="the vocoder stage's model: rebuild speech from units and score it")
    ap.add_argument("--listen", help="where the listening set's audio goes (default: <plots_dir>/listen)")
    ap.add_argument("--units-out", help="write the free-running units of every variant (and the true units) here")
    args = ap.parse_args()
    p, t = train_params.load("evaluate"), params.load("text")
    tr, tk = train_params.load("train"), train_params.load("tokenize")
    files = {"manifest_path": args.manifest, "whisper_path": args.whisper, "text_path": args.text, "s3_path": args.s3,
             "speaker_path": args.speaker}
    variants = [*tr.variants, *tr.finetune]
    voc = vocoder.load_params()
    rebuild = {"vocoder_dir": args.vocoder, "griffin_lim_iters": voc.griffin_lim_iters, "asr_model": p.asr_model,
               "utterances": p.rebuild_utterances, "listen": p.listen_utterances,
               "asr_window_s": p.asr_window_s} if args.vocoder else None
    result = evaluate.run(files, args.train_s3, {v: f"{args.models_dir}/{v}" for v in variants}, t.model,
                          tr.seed, p.batch_size,
                          p.attention_utterances, args.metrics, args.plots_dir, tr.device, p.buffer_rows,
                          {tk.model: args.train_codes} if args.train_codes else None, p.free_utterances,
                          p.free_top_k, args.words if args.words and Path(args.words).exists() else None, rebuild,
                          args.listen, args.units_out)
    for k in ("targets", "top1_acc", "change_top1_acc", "nll", "text_only_change_top1_acc", "text_only_nll",
              "shuffled_speech_change_top1_acc", "shuffled_speech_nll", "copy_prev_top1_acc",
              f"{tk.model}_nll", f"{tk.model}_gap_closed_nll", f"{tk.model}_bitrate_bps", "free_uer", "text_only_free_uer",
              "speaker_swap_delta_nll", "text_only_speaker_swap_delta_nll",
              "align_frame_acc", "align_uniform_frame_acc", "align_boundary_ms_median", "original_wer",
              "true_units_rebuilt_wer", "text_only_rebuilt_wer", "rebuilt_wer", f"{tk.model}_rebuilt_wer",
              f"{tk.model}_rebuilt_wer_gap_closed", f"{tk.model}_rebuilt_duration_corr"):
        print(f"{k}: {result.get(k)}")


if __name__ == "__main__":
    main()
