"""Repositories as documents: three archive media types, and a page's label (a
repository file's path). A new column on a table under row level security needs
nothing more: the table's policy covers every column of its rows."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("documents", "0007_chunk_search_title"),
    ]

    operations = [
        migrations.AddField(
            model_name="page",
            name="label",
            field=models.CharField(blank=True, max_length=500),
        ),
        migrations.AlterField(
            model_name="document",
            name="media_type",
            field=models.CharField(
                choices=[
                    ("application/pdf", "Pdf"),
                    (
                        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                        "Docx",
                    ),
                    ("text/html", "Html"),
                    ("text/markdown", "Markdown"),
                    ("text/plain", "Text"),
                    ("application/zip", "Zip"),
                    ("application/x-tar", "Tar"),
                    ("application/gzip", "Tar Gz"),
                ],
                max_length=100,
            ),
        ),
    ]
