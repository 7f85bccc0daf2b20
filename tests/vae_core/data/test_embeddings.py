"""The embeddings format: per-shard latent files, their manifest, and the readers built on them.

Real data throughout: scikit-learn's digits ingested into several small shards per split and encoded by
a (freshly initialised) digits ConvVAE.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.vae_core.data.conftest import MODEL, identity, publish
from vae_core.data.embeddings import (EmbeddingFile, EmbeddingManifest, build_table, check_rows, default_dir,
                                      embedding_schema, file_name, join_images, latents, read_embeddings,
                                      read_manifest, restamp, reusable_files, shard_table, with_earlier_splits,
                                      write_file, write_manifest)
from vae_core.data.output_location import check_output_location
from vae_core.data.shards import read_split_u8
from vae_core.storage import resolve


def test_schema_is_the_contract():
    s = embedding_schema(8)
    assert s.names == ["id", "split", "label", "mean", "logvar", "neg_elbo", "recon_error", "model_name",
                       "model_version", "dataset_version"]
    assert [f.nullable for f in s] == [False, False, True, False, False, True, False, False, False, False]
    assert s.field("neg_elbo").type == pa.float32() == s.field("recon_error").type
    assert embedding_schema(8, table_format=2).names == [n for n in s.names if n not in ("neg_elbo", "recon_error")]
    assert s.field("label").type == pa.int32() and s.field("model_version").type == pa.int32()
    assert s.field("mean").type == pa.list_(pa.float32(), 8) == s.field("logvar").type
    with pytest.raises(ValueError, match="0"):
        embedding_schema(0)


def test_a_shard_file_reads_with_pyarrow_and_pandas(digits, tmp_path):
    info, encoded = digits
    e = encoded[0]
    labels = e.labels.copy()
    labels[[1, 4]] = -1  # digits are all labelled; a source without labels gives -1
    table = build_table(e.ids, e.split, labels, e.mean, e.logvar, MODEL, 3, info.version, neg_elbo=e.neg_elbo,
                        recon_error=e.recon_error)
    fs, root = resolve(str(tmp_path))
    path = posixpath.join(root, e.split, file_name(e.sha256, identity(3)))
    write_file(fs, path, table)

    back = pq.read_table(path)
    assert back.schema.equals(embedding_schema(e.mean.shape[1]))
    assert back.column("label").null_count == 2 and back.column("label")[1].as_py() is None
    assert back.column("label")[0].as_py() == int(e.labels[0])
    assert back.column("model_version").unique().to_pylist() == [3]
    assert back.column("dataset_version").unique().to_pylist() == [info.version]

    df = pd.read_parquet(path)
    assert list(df.columns) == embedding_schema(8).names and len(df) == len(e.ids)
    np.testing.assert_array_equal(np.asarray(df["mean"].iloc[0], dtype=np.float32), e.mean[0])
    assert df["label"].isna().sum() == 2 and df["id"].tolist() == e.ids


def test_build_table_refuses_mismatches_and_non_finite_latents(digits):
    e = digits[1][0]
    args = dict(split="train", labels=e.labels, mean=e.mean, logvar=e.logvar, model_name=MODEL, model_version=1,
                dataset_version="v1", neg_elbo=e.neg_elbo, recon_error=e.recon_error)
    with pytest.raises(ValueError, match="ids need mean"):
        build_table(e.ids[:-1], **args)
    with pytest.raises(ValueError, match="labels"):
        build_table(e.ids, **{**args, "labels": e.labels[:-1]})
    with pytest.raises(ValueError, match="ids need mean"):
        build_table(e.ids, **{**args, "logvar": e.logvar[:, :-1]})
    bad = e.mean.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match=f"non-finite mean.*{e.ids[2]}"):
        build_table(e.ids, **{**args, "mean": bad})
    with pytest.raises(ValueError, match="'holdout'"):
        build_table(e.ids, **{**args, "split": "holdout"})
    with pytest.raises(ValueError, match=r"ids need recon_error of shape"):
        build_table(e.ids, **{**args, "recon_error": e.recon_error[:-1]})
    for score in ("neg_elbo", "recon_error"):  # a VAE's scores are numbers: NaN is a broken model, not "none"
        bad = getattr(e, score).copy()
        bad[3] = np.nan
        with pytest.raises(ValueError, match=f"non-finite {score} for 1 row.*{e.ids[3]}"):
            build_table(e.ids, **{**args, score: bad})


def test_file_name_and_default_dir():
    sha = "ab" * 32
    model = identity(4)
    assert file_name(sha, model) == f"{sha}-v4-{model.key}-f3.parquet" and len(model.key) == 16
    assert file_name(sha, model, table_format=2) == f"{sha}-v4-{model.key}.parquet"  # names of format 2
    # Name, version and weights are each part of the key: a re-created registry cannot alias two models.
    assert len({model.key, identity(4, b"other weights").key, identity(5).key, identity(4, name="vae-x").key}) == 4
    for bad in ("xyz", sha + "\n", sha.upper()):  # a checksum names a file: nothing but 64 lowercase hex digits
        with pytest.raises(ValueError, match="is not a lowercase hex SHA-256"):
            file_name(bad, model)
    with pytest.raises(ValueError, match="0"):
        identity(0)
    assert default_dir("s3://b/emb/", "vae-mnist", 3, "mnist", "3f2a") == "s3://b/emb/vae-mnist/3/mnist/3f2a"
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        default_dir("/r", "vae-mnist", 3, "../x", "3f2a")


def test_manifest_round_trip_and_counts(published, tmp_path):
    out, manifest = published
    assert read_manifest(out) == manifest
    assert EmbeddingManifest.model_validate_json(manifest.to_json()) == manifest
    wrong = manifest.model_dump()
    wrong["counts"]["train"] += 1
    with pytest.raises(ValueError, match="counts\\['train'\\]"):
        EmbeddingManifest.model_validate(wrong)
    with pytest.raises(ValueError, match=f"no embeddings manifest at {tmp_path}"):
        read_manifest(str(tmp_path))


def test_shard_table_puts_latent_rows_in_shard_order_each_id_once(digits):
    info, encoded = digits
    e = encoded[0]
    rows = e.table(info.version).select(["id", "label", "mean", "logvar", "neg_elbo", "recon_error"])
    shuffled = pa.concat_tables([rows.slice(3), rows.slice(0, 3)])  # latents come back in any order, chunked
    table = shard_table(shuffled, e.ids, "train/x.parquet", e.split, identity(2), info.version)
    assert table.column("id").to_pylist() == e.ids and table.schema == embedding_schema(e.mean.shape[1])
    np.testing.assert_array_equal(latents(table)[1], e.mean)
    np.testing.assert_array_equal(table.column("neg_elbo").to_numpy(), e.neg_elbo)
    assert set(table.column("model_version").to_pylist()) == {2}
    with pytest.raises(RuntimeError, match=r"train/x.parquet: the encoded rows are not the shard's ids, each once"):
        shard_table(pa.concat_tables([rows, rows.slice(0, 1)]), e.ids, "train/x.parquet", e.split, identity(2),
                    info.version)


def test_a_manifest_keeps_the_splits_an_earlier_run_of_its_model_wrote(published, tmp_path):
    out, manifest = published
    only_test = manifest.model_copy(update={"splits": {"test": manifest.splits["test"]},
                                            "counts": {"test": manifest.counts["test"]}})
    merged = with_earlier_splits(only_test, out)
    assert merged.splits == {**{s: f for s, f in manifest.splits.items() if s != "test"}, "test": manifest.splits["test"]}
    assert merged.counts == {s: sum(f.rows for f in files) for s, files in merged.splits.items()}
    other_model = only_test.model_copy(update={"weights_sha256": "0" * 64})
    assert with_earlier_splits(other_model, out) == other_model  # another model's files are not listed
    assert with_earlier_splits(only_test, str(tmp_path)) == only_test  # no earlier manifest


def test_read_embeddings_all_and_one_split(digits, published):
    info, encoded = digits
    out, manifest = published
    everything = read_embeddings(out)
    assert everything.num_rows == sum(manifest.counts.values()) == sum(info.counts.values())
    assert everything.column("id").to_pylist() == [i for e in encoded for i in e.ids]  # manifest order
    val = read_embeddings(out, splits=["val"])
    assert val.num_rows == manifest.counts["val"] and set(val.column("split").to_pylist()) == {"val"}
    with pytest.raises(ValueError, match="'nope'"):
        read_embeddings(out, splits=["nope"])


def test_read_embeddings_names_a_file_whose_rows_disagree(digits, tmp_path):
    info, encoded = digits
    fs, out = resolve(str(tmp_path / "out"))
    manifest = publish(fs, out, encoded, info.version)
    shortened = manifest.splits["train"][1]
    e = encoded[1]
    write_file(fs, posixpath.join(out, shortened.path), e.table(info.version).slice(0, len(e.ids) - 1))
    with pytest.raises(ValueError, match=f"{shortened.path}: manifest says {shortened.rows} rows"):
        read_embeddings(out)


def test_latents_are_exactly_the_arrays_that_went_in(digits, published):
    _, encoded = digits
    e = encoded[0]
    ids, mean, logvar = latents(e.table("v1"))
    assert ids == e.ids and mean.dtype == np.float32
    np.testing.assert_array_equal(mean, e.mean)
    np.testing.assert_array_equal(logvar, e.logvar)
    assert np.shares_memory(mean, e.mean)  # views, not copies
    ids, mean, logvar = latents(read_embeddings(published[0]))
    np.testing.assert_array_equal(mean, np.concatenate([e.mean for e in encoded]))
    np.testing.assert_array_equal(logvar, np.concatenate([e.logvar for e in encoded]))


def test_join_images_follows_the_table_order(digits, published):
    info = digits[0]
    table = read_embeddings(published[0])
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    images = join_images(table, info)
    pixels = {}
    for split in info.manifest.splits:
        x, _, ids = read_split_u8(info, split)
        pixels.update(zip(ids, x))
    expected = np.stack([pixels[i] for i in table.column("id").to_pylist()])
    np.testing.assert_array_equal(images, expected)

    val = read_embeddings(published[0], splits=["val"]).slice(0, 3)
    np.testing.assert_array_equal(join_images(val, info), np.stack([pixels[i] for i in val["id"].to_pylist()]))
    first = val["id"][0].as_py()
    unknown = val.set_column(0, val.schema.field("id"), pa.array([first, "ghost-1", "ghost-2"]))
    with pytest.raises(ValueError, match=r"2 id\(s\) not in dataset .*\['ghost-1', 'ghost-2'\]"):
        join_images(unknown, info)
    elsewhere = restamp(val, "train", info.version)  # the split is part of the key
    with pytest.raises(ValueError, match=f"3 id\\(s\\) .*'{first}'"):
        join_images(elsewhere, info)


def test_reusable_files_are_the_files_of_siblings_by_the_same_model(digits, tmp_path):
    info, encoded = digits
    fs, root = resolve(str(tmp_path))
    base = f"{root}/{MODEL}/1/digits"
    model = identity(1)
    assert reusable_files(fs, f"{base}/new", model) == {}  # nothing published at all

    old = publish(fs, f"{base}/old", encoded[:2], "old")
    publish(fs, f"{base}/retrained", encoded[:3], "retrained", weights=b"new weights")  # same name and version
    publish(fs, f"{base}/new", encoded[3:4], "new")  # the output folder itself does not count
    unfinished = posixpath.join(base, "half", encoded[4].split, file_name(encoded[4].sha256, model))
    write_file(fs, unfinished, encoded[4].table("half"))  # no manifest: a run that did not finish
    fs.makedirs(f"{base}/notes")
    fs.pipe_file(f"{base}/notes/manifest.json", b'{"not": "embeddings"}')  # some other folder's manifest
    found = reusable_files(fs, f"{base}/new/", model)
    assert found == {f.source_sha256: f"{base}/old/{f.path}" for files in old.splits.values() for f in files}
    assert reusable_files(fs, f"{base}/new", identity(1, b"new weights")).keys() == {e.sha256 for e in encoded[:3]}


def test_check_rows_names_a_file_of_another_model(digits):
    e = digits[1][0]
    table = e.table("v1")
    check_rows(table, identity(1), len(e.ids), "f.parquet")
    with pytest.raises(ValueError, match=rf"f.parquet: rows of model \['{MODEL}'\] version \[1\], not vae-b v1"):
        check_rows(table, identity(1, name="vae-b"), len(e.ids), "f.parquet")
    with pytest.raises(ValueError, match="f.parquet: .* rows, its input shard has"):
        check_rows(table.slice(1), identity(1), len(e.ids), "f.parquet")


def test_a_format_1_manifest_still_reads(digits, tmp_path):
    info, encoded = digits
    fs, out = resolve(str(tmp_path / "old"))
    e = encoded[0]
    rel = f"{e.split}/{e.sha256}-v1.parquet"
    write_file(fs, posixpath.join(out, rel), e.table(info.version).drop_columns(["neg_elbo", "recon_error"]))
    manifest = EmbeddingManifest(format=1, model_name=MODEL, model_version=1, model_uri=f"models:/{MODEL}/1",
                                 dataset="digits", dataset_version=info.version, latent_dim=e.mean.shape[1],
                                 splits={e.split: [EmbeddingFile(path=rel, rows=len(e.ids), source_sha256=e.sha256)]},
                                 counts={e.split: len(e.ids)})
    write_manifest(fs, out, manifest)
    assert read_embeddings(str(tmp_path / "old")).num_rows == len(e.ids)
    assert manifest.identity is None  # nothing to reuse it by
    with pytest.raises(ValueError, match="format 2 manifests need weights_sha256"):
        EmbeddingManifest.model_validate({**manifest.model_dump(), "format": 2})


def test_an_output_location_that_could_reach_a_dataset_is_refused(digits, tmp_path):
    info = digits[0]
    root = posixpath.dirname(posixpath.dirname(info.path))  # the data root the fixture ingested into
    check_output_location(str(tmp_path / "embeddings"), root)  # elsewhere: fine
    for out, how in [(info.path, "is inside"), (root, "is"), (posixpath.dirname(root), "contains"),
                     (f"file://{info.path}/../..", "is"), (f"{root}/digits/../new", "is inside")]:
        with pytest.raises(ValueError, match=f"output .* {how} the data root {root}"):
            check_output_location(out, root)
    link = tmp_path / "link"
    link.symlink_to(info.path)
    with pytest.raises(ValueError, match=f"output {link}/x .*is inside the data root {root}"):
        check_output_location(f"{link}/x", root)
    # A dataset folder anywhere, whatever the data root in force says.
    with pytest.raises(ValueError, match=f"output {info.path}/train is inside the dataset folder {info.path}"):
        check_output_location(f"{info.path}/train", str(tmp_path / "another-root"))
    # A manifest.json at the output that this command did not write would be replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.json").write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match="holds a manifest.json that is not an embeddings manifest"):
        check_output_location(str(tmp_path / "mine"), root)
    check_output_location("memory://emb/x", "memory://datasets")
    with pytest.raises(ValueError, match="is inside the data root"):
        check_output_location("memory://datasets/digits", "memory://datasets")


def test_restamp_changes_only_the_stamps(digits):
    e = digits[1][0]
    table = e.table("v1")
    moved = restamp(table, "test", "v2")
    assert moved.schema.equals(table.schema)
    assert moved.column("split").unique().to_pylist() == ["test"]
    assert moved.column("dataset_version").unique().to_pylist() == ["v2"]
    assert moved.drop_columns(["split", "dataset_version"]).equals(table.drop_columns(["split", "dataset_version"]))
    with pytest.raises(ValueError, match="'a/b'"):
        restamp(table, "test", "a/b")


def test_write_and_read_back_on_s3(s3, digits):
    fs, options = s3
    info, encoded = digits
    some = [e for e in encoded if e.split != "train"]
    out = default_dir("vae-bucket/emb", MODEL, 1, "digits", info.version)
    manifest = publish(fs, out, some, info.version)
    url = f"s3://{out}"
    assert read_manifest(url, storage_options=options) == manifest
    table = read_embeddings(url, storage_options=options)
    assert table.equals(pa.concat_tables([e.table(info.version) for e in some]))
    assert read_embeddings(url, splits=["test"], storage_options=options).num_rows == manifest.counts["test"]
